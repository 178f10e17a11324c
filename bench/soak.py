"""Soak: a long run of adapter traffic against one `vllm-jd serve`, with the worker's memory sampled
and a hostile client on the side. One JSON line per phase, then a summary line.

    python bench/soak.py [--adapters 320] [--requests 20000] [--warmup 2000] [--base 4000]
                         [--concurrency 128] [--sample-every 1000] [--workdir DIR] [--out F.jsonl]

Builds the demo's setting (tiny bf16 Llama, synthetic rank-8 adapters on q/k/v/o, auto compress)
unless --workdir already holds it, starts the server with registration on, then:

1. warm-up: ``--warmup`` adapter requests (every kernel shape and cache settles);
2. baseline: ``--base`` base-model requests (the worker's memory without adapters in play);
3. soak: ``--requests`` requests, ``model`` = a random adapter, prompts of 1–40 random words,
   max_tokens 8–32, ``--concurrency`` clients; meanwhile a hostile client keeps sending what must
   be refused (huge weights, a FIFO as weights file, a path outside the root, a bad name) and
   load/unload cycles of a good adapter, and checks every answer.

The worker is vLLM's model process (VLLM::Worker or, without one, the server's largest child);
memory is its RSS from /proc/PID/smaps_rollup. Growth is (last − first sample) / first of a phase.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import string
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import psutil
from machine import machine
from servers import start, stop

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def build(work: Path, n: int) -> None:
    """The demo's model, adapters and store (skipped where they exist)."""
    if (work / "store" / "manifest.json").exists():
        return
    py = str(BIN / "python")
    subprocess.run([py, "scripts/make_tiny_model.py", str(work / "model")], cwd=ROOT, check=True)
    common = ["--layers", "2", "--hidden", "256", "--kv-dim", "128", "--rank", "8",
              "--targets", "q_proj,k_proj,v_proj,o_proj"]
    subprocess.run([py, "scripts/make_adapters.py", str(work / "adapters"), "--n", str(n), *common,
                    "--structure", "shared", "--seed", "0"], cwd=ROOT, check=True)
    # registered while serving: copies of two store adapters (they project onto a shared cluster)
    subprocess.run([py, "scripts/make_adapters.py", str(work / "root"), "--n", "2", *common, "--structure", "shared",
                    "--seed", "0"], cwd=ROOT, check=True)
    subprocess.run([str(BIN / "vllm-jd"), "-q", "compress", str(work / "adapters"), "--out", str(work / "store")],
                   check=True)
    hostile(work / "root")


def hostile(root: Path) -> None:
    """Adapters under the root that registration must refuse (the good ones are adapter-000x)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    for name, value in (("huge", 1e17), ("overflow", 1e19)):
        shutil.copytree(root / "adapter-0000", root / name)
        f = root / name / "adapter_model.safetensors"
        save_file({k: torch.full_like(v, value) for k, v in load_file(str(f)).items()}, str(f))
    shutil.copytree(root / "adapter-0000", root / "fifo")
    (root / "fifo" / "adapter_model.safetensors").unlink()
    os.mkfifo(root / "fifo" / "adapter_model.safetensors")


def worker_pid(server: int) -> int:
    procs = psutil.Process(server).children(recursive=True)
    for p in procs:
        try:
            if "Worker" in " ".join(p.cmdline()):
                return p.pid
        except psutil.Error:
            pass
    return max(procs, key=lambda p: p.memory_info().rss).pid


def rss_mb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Rss:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError(f"no Rss for process {pid}")


async def phase(url: str, models: list[str], n: int, concurrency: int, pid: int, every: int, seed: int,
                keepalive: float = 2.0) -> dict:
    """n requests from ``concurrency`` clients; the worker's RSS every ``every`` completions."""
    rng = random.Random(seed)
    state = {"next": 0, "done": 0, "errors": 0}
    kinds: dict[str, int] = {}  # what each error was: an HTTP status, or the client exception
    finished: list[float] = []  # when each request ended: the longest gap is the longest stall
    latency: list[float] = []
    samples = [{"requests": 0, "rss_mb": rss_mb(pid)}]
    t0 = time.perf_counter()

    async def client(session: aiohttp.ClientSession) -> None:
        while state["next"] < n:
            state["next"] += 1
            words = " ".join("".join(rng.choices(string.ascii_lowercase, k=rng.randint(1, 7)))
                             for _ in range(rng.randint(1, 40)))
            body = {"model": rng.choice(models), "prompt": words, "max_tokens": rng.randint(8, 32),
                    "temperature": 0, "ignore_eos": True}
            t = time.perf_counter()
            try:
                async with session.post(f"{url}/v1/completions", json=body) as r:
                    await r.read()
                    ok, kind = r.status == 200, str(r.status)
            except (TimeoutError, aiohttp.ClientError) as e:
                ok, kind = False, type(e).__name__
            state["done"] += 1
            state["errors"] += not ok
            finished.append(time.perf_counter())
            if not ok:
                kinds[kind] = kinds.get(kind, 0) + 1
            latency.append(time.perf_counter() - t)
            if state["done"] % every == 0:
                samples.append({"requests": state["done"], "rss_mb": rss_mb(pid)})

    # kept-alive connections are dropped before the server's 5 s idle close (VLLM_HTTP_TIMEOUT_KEEP_ALIVE):
    # reusing one the server closes as a request goes out is a client-side race, not a server error
    conn = aiohttp.TCPConnector(limit=0, keepalive_timeout=keepalive)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=600)) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    latency.sort()
    first, last = samples[0]["rss_mb"], samples[-1]["rss_mb"]
    gap = max((b - a for a, b in zip(finished, finished[1:], strict=False)), default=0.0)
    return {"requests": n, "errors": state["errors"], "error_kinds": kinds, "requests_per_s": round(n / wall, 1),
            "p50_latency_s": round(latency[len(latency) // 2], 3),
            "p99_latency_s": round(latency[min(len(latency) - 1, int(len(latency) * 0.99))], 3),
            "longest_stall_s": round(gap, 2), "rss_growth_pct": round(100 * (last - first) / first, 2),
            "rss_samples": samples}


HOSTILE = [("huge", "huge", 400), ("overflow", "overflow", 400), ("fifo", "fifo", 400),
           ("escape", "../store", 403), ("bad\u202ename", "adapter-0000", 400)]


async def hostile_client(url: str, stop_at: asyncio.Event) -> dict:
    """Bad registrations (each must get its status) and good load/unload cycles, until told to stop."""
    tally = {"sent": 0, "unexpected": []}

    async def send(s: aiohttp.ClientSession, route: str, body: dict, want: int) -> None:
        tally["sent"] += 1
        try:
            async with s.post(f"{url}/v1/{route}_lora_adapter", json=body) as r:
                if r.status != want:
                    tally["unexpected"].append([route, body["lora_name"], r.status, (await r.text())[:200]])
        except (TimeoutError, aiohttp.ClientError) as e:
            tally["unexpected"].append([route, body["lora_name"], type(e).__name__, str(e)[:200]])

    # a new connection per request: a kept-alive one the server closes as we send is a client race, not a finding
    conn = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as s:
        i = 0
        while not stop_at.is_set():
            name, path, want = HOSTILE[i % len(HOSTILE)]
            await send(s, "load", {"lora_name": name, "lora_path": path}, want)
            await send(s, "load", {"lora_name": "cycled", "lora_path": "adapter-0001"}, 200)
            await send(s, "unload", {"lora_name": "cycled"}, 200)
            i += 1
            await asyncio.sleep(0.5)
    return tally


async def run(args, url: str, pid: int, names: list[str], base: str) -> list[dict]:
    common = dict(concurrency=args.concurrency, pid=pid, every=args.sample_every, keepalive=args.client_keepalive)
    out = [{"phase": "warmup", **await phase(url, names, args.warmup, seed=1, **common)}]
    out.append({"phase": "base", **await phase(url, [base], args.base, seed=2, **common)})
    stop_at = asyncio.Event()
    side = asyncio.create_task(hostile_client(url, stop_at))
    soak = await phase(url, names, args.requests, seed=3, **common)
    stop_at.set()
    out.append({"phase": "soak", **soak, "hostile": await side})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapters", type=int, default=320)
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--warmup", type=int, default=2000)
    p.add_argument("--base", type=int, default=4000)
    p.add_argument("--concurrency", type=int, default=128)
    p.add_argument("--sample-every", type=int, default=1000)
    p.add_argument("--client-keepalive", type=float, default=2.0,
                   help="seconds the client keeps an idle connection (below the server's 5 s; aiohttp's default is 15)")
    p.add_argument("--server-keepalive", type=int, default=None,
                   help="the server's idle keep-alive in seconds (VLLM_HTTP_TIMEOUT_KEEP_ALIVE; default: vllm-jd serve's, 75)")
    p.add_argument("--port", type=int, default=8731)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/vllm-jd-soak"))
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    build(work, args.adapters)
    # the cycled adapter's deletion gives its row back: 8 spare rows are plenty however long the run
    server = start([str(BIN / "vllm-jd"), "serve", str(work / "model"), "--jd-store", str(work / "store"),
                    "--jd-adapter-root", str(work / "root"), "--jd-unload-deletes", "--jd-spare-adapters", "8",
                    "--host", "127.0.0.1", "--port", str(args.port), "--max-model-len", "512"],
                   args.port, work / "server.log",
                   env={"VLLM_HTTP_TIMEOUT_KEEP_ALIVE": str(args.server_keepalive)} if args.server_keepalive else None)
    try:
        from vllm_jd.store.format import read_manifest

        manifest = read_manifest(work / "store")
        names = list(manifest.adapters)
        rank = max(c.rank for c in manifest.clusters)
        env = machine()
        path = "fused" if env["amx"] and rank % 32 == 0 else "ops"  # jd_lora_torch's auto choice at bf16
        results = asyncio.run(run(args, f"http://127.0.0.1:{args.port}", worker_pid(server.pid), names,
                                  str(work / "model")))
    finally:
        stop(server)
    lines = [{"bench": "soak", **env, "kernel_path": path, "rank": rank, "adapters": len(names),
              "concurrency": args.concurrency, **r} for r in results]
    soak = results[-1]
    lines.append({"bench": "soak", "summary": True, **env, "kernel_path": path,
                  "soak_requests": soak["requests"], "soak_errors": soak["errors"],
                  "hostile_unexpected": len(soak["hostile"]["unexpected"]), "p99_latency_s": soak["p99_latency_s"],
                  "rss_growth_pct_soak": soak["rss_growth_pct"], "rss_growth_pct_base": results[1]["rss_growth_pct"]})
    for line in lines:
        print(json.dumps(line), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(x) + "\n" for x in lines)


if __name__ == "__main__":
    main()
