"""Start/stop OpenAI-compatible servers and drive them with requests (shared by the throughput benches)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import aiohttp

WORDS = "the of and to in is for on with as by at from that this it be are was not or have an which".split()


def start(cmd: list[str], port: int, log: Path, timeout: float = 600, env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "2", **(env or {})}
    env = {k: v for k, v in env.items() if v is not None}  # a None in ``env``: the variable unset
    env.pop("VLLM_JD_STORE", None)
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)  # its own process group, so stop() ends its workers too
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {log}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return proc
        except OSError:
            time.sleep(0.5)
    stop(proc)
    raise RuntimeError(f"server not up after {timeout} s; see {log}")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server; after 60 s SIGKILL its whole process group (engine core, workers)."""
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(60)


async def drive(port: int, jobs: list[tuple[str, str]], concurrency: int, max_tokens: int) -> dict:
    """Send every (model, prompt) job with ``concurrency`` clients; requests/s and latencies."""
    queue: asyncio.Queue = asyncio.Queue()
    for j in jobs:
        queue.put_nowait(j)
    latencies: list[float] = []
    errors = 0

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        while not queue.empty():
            model, prompt = queue.get_nowait()
            t = time.perf_counter()
            async with session.post(f"http://127.0.0.1:{port}/v1/completions",
                                    json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                          "temperature": 0, "ignore_eos": True}) as r:
                await r.read()
                errors += r.status != 200
            latencies.append(time.perf_counter() - t)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    latencies.sort()
    return {"requests": len(jobs), "errors": errors, "seconds": round(wall, 2),
            "requests_per_s": round(len(jobs) / wall, 2),
            "p50_latency_s": round(latencies[len(latencies) // 2], 3),
            "p99_latency_s": round(latencies[int(len(latencies) * 0.99) - 1], 3)}




async def send_open_loop(port: int, jobs: list[dict], arrivals: list[float], timeout: float = 600) -> dict:
    """Send job i at ``arrivals[i]`` seconds after the start (open loop; all 0 = all at once).

    jobs: {"model", "prompt", "max_tokens"}. Streams each completion to time its first token.
    Returns requests/s (completed / wall time until the last response), output tokens/s, and
    p50/p99 of latency and time to first token. A request that fails counts in ``errors``.
    """
    ttft: list[float] = []
    latency: list[float] = []
    tokens = 0
    errors = 0
    t0 = time.perf_counter()

    async def one(session: aiohttp.ClientSession, job: dict, at: float) -> None:
        nonlocal tokens, errors
        await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
        t = time.perf_counter()
        first = None
        try:
            async with session.post(f"http://127.0.0.1:{port}/v1/completions",
                                    json={**job, "temperature": 0, "ignore_eos": True, "stream": True}) as r:
                if r.status != 200:
                    errors += 1
                    await r.read()
                    return
                async for line in r.content:
                    if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
                        if first is None:
                            first = time.perf_counter() - t
                        tokens += sum(1 for c in json.loads(line[6:])["choices"] if c.get("text") is not None)
        except (TimeoutError, aiohttp.ClientError):
            errors += 1
            return
        latency.append(time.perf_counter() - t)
        ttft.append(first if first is not None else latency[-1])

    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        await asyncio.gather(*(one(session, j, a) for j, a in zip(jobs, arrivals, strict=True)))
    wall = time.perf_counter() - t0

    def pct(xs: list[float], q: float) -> float | None:
        return round(sorted(xs)[min(len(xs) - 1, int(len(xs) * q))], 3) if xs else None

    done = len(latency)
    return {"requests": len(jobs), "completed": done, "errors": errors, "seconds": round(wall, 2),
            "requests_per_s": round(done / wall, 2), "output_tokens_per_s": round(tokens / wall, 1),
            "p50_latency_s": pct(latency, 0.5), "p99_latency_s": pct(latency, 0.99),
            "p50_ttft_s": pct(ttft, 0.5), "p99_ttft_s": pct(ttft, 0.99)}
