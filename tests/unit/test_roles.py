"""Role flags as Dynamo's launch scripts combine them."""

from __future__ import annotations

import pytest

from epdserve.config import Role, parse_worker_args

MM = ["--enable-multimodal", "--model", "m"]


@pytest.mark.parametrize("flags, role", [
    (["--multimodal-worker"], Role.PD),
    (["--multimodal-worker", "--is-prefill-worker"], Role.PREFILL),
    (["--multimodal-decode-worker"], Role.DECODE),
    (["--multimodal-encode-prefill-worker", "--is-prefill-worker"], Role.ENCODE_PREFILL),
    (["--multimodal-encode-prefill-worker"], Role.PD),   # aggregated Llama 4: encodes inline
    (["--multimodal-encode-worker"], Role.ENCODE),
])
def test_role_flags(flags, role):
    assert parse_worker_args(flags + MM, {}).role is role


@pytest.mark.parametrize("flags", [
    ["--multimodal-decode-worker", "--is-prefill-worker"],
    ["--is-prefill-worker"],
    ["--multimodal-worker", "--multimodal-decode-worker"],
])
def test_bad_role_combinations_are_refused(flags):
    with pytest.raises(SystemExit):
        parse_worker_args(flags + MM, {})
