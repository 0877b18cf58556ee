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


def test_every_role_is_wired_in_one_table():
    from epdserve.processor.service import ProcessorService
    from epdserve.worker.__main__ import services_of
    from epdserve.worker.roles import ROLES
    from epdserve.worker.services import EncodeService, PDService
    assert set(ROLES) == set(Role)
    assert {role: services_of(role) for role in Role} == {
        Role.PROCESSOR: (ProcessorService,),
        Role.PD: (PDService,),
        Role.PREFILL: (PDService,),
        Role.ENCODE_PREFILL: (PDService,),
        Role.DECODE: (PDService,),
        Role.ENCODE: (EncodeService,),
        Role.NATIVE_ENCODER: (EncodeService,),
        Role.TEXT: (PDService, ProcessorService),
    }
    assert [r for r in Role if ROLES[r].kv_transfer] == [Role.PREFILL, Role.DECODE, Role.ENCODE_PREFILL]
