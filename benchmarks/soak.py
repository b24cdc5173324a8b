"""Reliability soak of vLLM's OpenAI server with a TWLA checkpoint, on localhost, bounded in time.

    python benchmarks/soak.py [--model DIR] [--duration 180] [--clients 32] [--burst 128] [--max-tokens 16]
                              [--json benchmarks/results/soak.json]

Starts `python -m vllm.entrypoints.openai.api_server` on 127.0.0.1 (a synthetic TWLA Llama unless --model),
then: `clients` threads each sending streaming /v1/completions back to back for `duration` seconds; then a
burst of `burst` requests released at once. A request fails unless it returns 200, streams to `data: [DONE]`
and reports exactly max_tokens completion tokens (ignore_eos). Every request is greedy on one of a few prompts:
all answers to one prompt must be the same text (counted as greedy_mismatches). Reports per scenario the
requests, failures, p50/p95 latency (whole request) and the server's RSS (front end + engine processes) before
and after, prints a markdown table and writes the JSON rows of `/work/shared/design/results.md`'s soak.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone

import psutil
import requests

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["Hello world", "The quick brown fox", "abc", "TWLA serves ternary weights!", "Once upon a time"]
REQUEST_TIMEOUT = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, log) -> subprocess.Popen:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                             "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
                             "--max-model-len", "256", "--gpu-memory-utilization", "0.3"],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_healthy(base: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before becoming healthy")
        try:
            if requests.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(2)
    raise RuntimeError(f"server not healthy after {timeout:.0f} s")


def server_rss_mb(proc: subprocess.Popen) -> float:
    """Resident memory of the server and every process it started (engine core, workers), in MB."""
    root = psutil.Process(proc.pid)
    total = 0
    for p in [root, *root.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return round(total / 2**20, 1)


class Client:
    """One request at a time; records (latency ms, ok, prompt index, text or error)."""

    def __init__(self, base: str, model: str, max_tokens: int):
        self.base, self.model, self.max_tokens = base, model, max_tokens
        self.session = requests.Session()

    def request(self, i: int, stream: bool) -> tuple[float, bool, int, str]:
        body = {"model": self.model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": self.max_tokens,
                "temperature": 0, "ignore_eos": True, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        t0 = time.perf_counter()
        try:
            with self.session.post(f"{self.base}/v1/completions", json=body, stream=stream,
                                   timeout=REQUEST_TIMEOUT) as r:
                if r.status_code != 200:
                    return _ms(t0), False, i, f"HTTP {r.status_code}: {r.text[:200]}"
                text, tokens = self._read(r, stream)
        except (requests.RequestException, ValueError, KeyError) as e:
            return _ms(t0), False, i, f"{type(e).__name__}: {e}"
        if tokens != self.max_tokens:
            return _ms(t0), False, i, f"{tokens} completion tokens, expected {self.max_tokens}"
        return _ms(t0), True, i, text

    @staticmethod
    def _read(r: requests.Response, stream: bool) -> tuple[str, int]:
        if not stream:
            out = r.json()
            return out["choices"][0]["text"], out["usage"]["completion_tokens"]
        text, tokens, done = [], -1, False
        for line in r.iter_lines(decode_unicode=True):
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            if chunk.get("choices"):
                text.append(chunk["choices"][0]["text"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
        if not done:
            raise ValueError("stream ended without [DONE]")
        return "".join(text), tokens


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000


def soak(base: str, model: str, clients: int, seconds: float, max_tokens: int) -> list[tuple]:
    results: list[tuple] = []
    lock = threading.Lock()
    stop = time.time() + seconds

    def worker(w: int) -> None:
        c = Client(base, model, max_tokens)
        n = w
        while time.time() < stop:
            res = c.request(n, stream=True)
            n += clients
            with lock:
                results.append(res)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def burst(base: str, model: str, n: int, max_tokens: int) -> list[tuple]:
    results: list[tuple] = []
    lock = threading.Lock()
    gate = threading.Barrier(n)

    def one(i: int) -> None:
        c = Client(base, model, max_tokens)
        gate.wait()  # all released at once
        res = c.request(i, stream=i % 2 == 0)  # half streaming, half not
        with lock:
            results.append(res)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def summarize(name: str, results: list[tuple], rss_before: float, rss_after: float) -> dict:
    ok = sorted(r[0] for r in results if r[1])
    q = statistics.quantiles(ok, n=20) if len(ok) >= 2 else [float("nan")] * 19
    return {"scenario": name, "requests": len(results), "failures": sum(not r[1] for r in results),
            "p50_ms": round(statistics.median(ok), 1) if ok else None, "p95_ms": round(q[18], 1) if ok else None,
            "rss_mb_before": rss_before, "rss_mb_after": rss_after}


def greedy_mismatches(results: list[tuple]) -> int:
    """Answers that differ from the most common answer to the same prompt (greedy: all should agree)."""
    by_prompt: dict[int, list[str]] = {}
    for _, ok, i, text in results:
        if ok:
            by_prompt.setdefault(i % len(PROMPTS), []).append(text)
    return sum(len(v) - max(v.count(t) for t in set(v)) for v in by_prompt.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="TWLA checkpoint directory (default: a synthetic TWLA Llama in a temp dir)")
    ap.add_argument("--duration", type=float, default=180, help="seconds of the streaming soak")
    ap.add_argument("--clients", type=int, default=32, help="concurrent streaming clients")
    ap.add_argument("--burst", type=int, default=128, help="requests released at once after the soak")
    ap.add_argument("--max-tokens", type=int, default=16, help="completion tokens per request")
    ap.add_argument("--json", help="write the rows here (e.g. benchmarks/results/soak.json)")
    a = ap.parse_args()

    tmp = tempfile.TemporaryDirectory(prefix="twla-soak-")
    model = a.model
    if model is None:
        sys.path.insert(0, REPO)
        from twla_offline.synthetic import make_synthetic_checkpoint

        model = make_synthetic_checkpoint(os.path.join(tmp.name, "llama"), arch="llama", seed=1)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = os.path.join(tmp.name, "server.log")
    with open(log_path, "w+") as log:
        proc = start_server(model, port, log)
        try:
            t0 = time.time()
            wait_healthy(base, proc)
            print(f"server healthy after {time.time() - t0:.0f} s", flush=True)
            for i in range(len(PROMPTS)):  # warm-up: compile and first batches before measuring memory
                Client(base, model, a.max_tokens).request(i, stream=False)
            rss0 = server_rss_mb(proc)
            print(f"soak: {a.clients} streaming clients for {a.duration:.0f} s", flush=True)
            soaked = soak(base, model, a.clients, a.duration, a.max_tokens)
            rss1 = server_rss_mb(proc)
            print(f"burst: {a.burst} requests at once", flush=True)
            burst_res = burst(base, model, a.burst, a.max_tokens)
            time.sleep(5)
            rss2 = server_rss_mb(proc)
            healthy = requests.get(f"{base}/health", timeout=10).status_code == 200
        except BaseException:
            log.seek(0)
            print(log.read()[-5000:], file=sys.stderr)
            raise
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    rows = [summarize(f"stream-{a.clients}x{a.duration:.0f}s", soaked, rss0, rss1),
            summarize(f"burst-{a.burst}", burst_res, rss1, rss2)]
    errors = sorted({r[3] for r in soaked + burst_res if not r[1]})
    out = {"device": "cpu", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "command": "python " + " ".join(sys.argv), "model": a.model or "synthetic TWLA Llama (tests' checkpoint)",
           "max_tokens": a.max_tokens, "greedy_mismatches": greedy_mismatches(soaked + burst_res),
           "healthy_after": healthy, "errors": errors[:10], "rows": rows}
    print("| scenario | requests | failures | p50 ms | p95 ms | server RSS MB before -> after |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['scenario']} | {r['requests']} | {r['failures']} | {r['p50_ms']} | {r['p95_ms']} | "
              f"{r['rss_mb_before']} -> {r['rss_mb_after']} |")
    print(f"greedy mismatches: {out['greedy_mismatches']}; healthy after: {healthy}; errors: {errors[:3]}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    tmp.cleanup()


if __name__ == "__main__":
    main()
