"""OpenAI server path on a GPU box: start `python -m vllm.entrypoints.openai.api_server` on a TWLA checkpoint,
wait for /health, send one /v1/completions and one /v1/chat/completions request, print the answers (or
the server log's tail when it does not come up), stop the server.

    python benchmarks/gpu_server.py --model DIR [--port 8011] [--timeout 240] [-- extra server args]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.request


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def healthy(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--port", type=int, default=8011)
    ap.add_argument("--timeout", type=float, default=240)
    ap.add_argument("extra", nargs="*")
    a = ap.parse_args()
    base = f"http://127.0.0.1:{a.port}"
    log = open("/tmp/twla-gpu-server.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", a.model,
                             "--host", "127.0.0.1", "--port", str(a.port), "--gpu-memory-utilization", "0.3",
                             "--max-model-len", "2048", *a.extra], stdout=log, stderr=subprocess.STDOUT)
    t0 = time.time()
    try:
        while not healthy(base):
            if proc.poll() is not None or time.time() - t0 > a.timeout:
                log.seek(0)
                state = f"exited with {proc.returncode}" if proc.poll() is not None else f"not healthy in {a.timeout:.0f} s"
                print(f"server {state}; log tail:\n{log.read()[-4000:]}")
                return 1
            time.sleep(2)
        print(f"server healthy after {time.time() - t0:.0f} s")
        c = post(f"{base}/v1/completions", {"model": a.model, "prompt": "The capital of France is", "max_tokens": 16,
                                            "temperature": 0})
        print("completions:", repr(c["choices"][0]["text"]))
        c = post(f"{base}/v1/chat/completions", {"model": a.model, "max_tokens": 16, "temperature": 0,
                                                 "messages": [{"role": "user", "content": "Say hello."}]})
        print("chat:", repr(c["choices"][0]["message"]["content"]))
        return 0
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    sys.exit(main())
