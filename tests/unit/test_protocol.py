"""The generated protobuf module is current, and OpenAI request validation speaks 400s."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from epdserve.protocol import epdserve_pb2
from epdserve.protocol.errors import EpdError
from epdserve.protocol.openai import parse_request

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_current(tmp_path):
    # In a child process: grpc_tools' protobuf runtime and NIXL's abort when both load in one.
    subprocess.run([sys.executable, "-m", "epdserve.protocol.codegen",
                    "--proto", str(ROOT / "protos" / "epdserve.proto"), "--out-dir", str(tmp_path)], check=True)
    checked_in = Path(epdserve_pb2.__file__).parent
    for name in ("epdserve_pb2.py", "epdserve_pb2.pyi"):
        assert (tmp_path / name).read_text() == (checked_in / name).read_text(), \
            "run: python -m epdserve.protocol.codegen"


@pytest.mark.parametrize("body, param", [
    (b'{"model": "m"', None),
    (b'{"model": "m"}', "messages"),
    (b'{"model": "m", "messages": []}', "messages"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 9}', "temperature"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', "max_tokens"),
])
def test_invalid_chat_requests_are_400(body, param):
    with pytest.raises(EpdError) as err:
        parse_request("chat", body)
    assert err.value.code == 400
    if param:
        assert err.value.param == param
    assert err.value.to_openai()["error"]["code"] == 400


def test_unknown_fields_are_accepted():
    req = parse_request("chat", b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "user": "u",'
                                b' "stop": "END", "presence_penalty": 0}')
    assert req.stop_strings == ["END"] and req.token_limit is None
    assert parse_request("completions", b'{"model": "m", "prompt": "hi"}').token_limit == 16
