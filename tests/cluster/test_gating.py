"""`--enable-multimodal` gating: refused start-up, model cards, and 400s for media."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import httpx
import pytest

from support.cluster import ROOT, start
from support.oracle import data_url, hf_greedy, make_image


def test_multimodal_role_without_flag_refuses_to_start(tmp_path):
    roles = ("--multimodal-worker", "--multimodal-processor", "--multimodal-encode-worker",
             "--multimodal-decode-worker", "--multimodal-encode-prefill-worker")
    procs = {role: subprocess.Popen([sys.executable, "-m", "epdserve.worker", role, "--model", str(tmp_path)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for role in roles}   # all at once: each spends its time importing torch
    try:
        for role, proc in procs.items():
            _, stderr = proc.communicate(timeout=120)
            assert proc.returncode != 0, role
            assert "--enable-multimodal" in stderr, (role, stderr)
    finally:
        for proc in procs.values():   # any still running (a failed assertion above): killed by PID
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def text_only(infra, tiny_llava, tmp_path_factory):
    """Frontend plus a worker started without any multimodal flag."""
    model_dir = tiny_llava

    def command(port: int, namespace: str) -> list[str]:
        py = sys.executable
        script = (f"{py} -m epdserve.frontend --http-host 127.0.0.1 --http-port {port} --namespace {namespace} & "
                  f"{py} -m epdserve.worker --model {model_dir} --served-model-name plain --namespace {namespace} & "
                  "trap 'kill $(jobs -p); wait' TERM; wait")
        return ["bash", "-c", script]

    c = start(command, infra, tmp_path_factory.mktemp("logs") / "text-only.log", "plain")
    yield c, model_dir
    c.stop()


def test_media_for_model_without_multimodal_is_400(text_only):
    cluster, model_dir = text_only
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(make_image(1))}},
                                             {"type": "text", "text": "What is this?"}]}]
    resp = httpx.post(cluster.base_url + "/v1/chat/completions", timeout=60,
                      json={"model": "plain", "messages": messages, "max_tokens": 4})
    assert resp.status_code == 400
    assert "--enable-multimodal" in resp.json()["error"]["message"]
    text_messages = [{"role": "user", "content": "Tell me a story."}]
    r = cluster.client().chat.completions.create(model="plain", messages=text_messages, max_tokens=8,
                                                 temperature=0, extra_body={"return_token_ids": True})
    assert r.choices[0].model_extra["token_ids"] == hf_greedy(model_dir, text_messages, max_tokens=8)


def test_model_cards_record_enable_multimodal(infra, text_only):
    from epdserve.runtime.discovery import Discovery

    async def cards() -> list[dict]:
        namespace = "t" + text_only[0].tag[:8]
        d = await Discovery.connect(infra.etcd_endpoints, namespace, 5)
        try:
            watch = await d.watch(d.key("models", ""))
            values = [json.loads(v) for v in watch.items().values()]
            await watch.close()
            return values
        finally:
            await d.close()

    found = asyncio.run(cards())
    assert {c["input"] for c in found} == {"text", "tokens"}
    assert all(c["servedModelName"] == "plain" and not c.get("enableMultimodal") for c in found)
