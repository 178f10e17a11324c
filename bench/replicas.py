"""Replicas split by cluster against replicas routed by adapter (Ray Serve LLM's way), in one run.

`python bench/replicas.py [--replicas 2] [--clusters 16] [--k 8] [--popularity zipf:1.0]`

The store of bench/scheduling.py (``--adapters`` synthetic rank-16 adapters in ``--clusters``
planted groups on q/k/v of a tiny bf16 Llama, compressed to that many clusters) is served by
`vllm-jd serve-ray --replicas N --clusters-per-replica K` twice, each started alone: routed by
the adapter's cluster (Ray Serve multiplexing on the cluster id), then by the adapter id. The
same requests (popularity over adapters: Zipf P(k) ∝ k^−α as S-LoRA defines it, or uniform) at
the same Poisson arrival times go to both. Reported: requests/s, p50/p99 time to first token, and
cluster loads per 1,000 requests summed over the replicas' servers (their
``vllm_jd_cluster_loads_total``, read before and after each round) and the busiest replica's
share of the requests, the median of ``--rounds``; then the ratios cluster / adapter. One JSON
line per result.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from paper_protocol import workload
from scheduling import build_store, check_workload_args, cluster_loads, workload_parser
from servers import send_open_loop

ROUTINGS = ("cluster", "adapter")


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = workload_parser(__doc__, k=8, popularity="zipf:1.0", port=8474)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--routings", default=",".join(ROUTINGS))
    ap.add_argument("--max-ongoing-requests", type=int, default=256,
                    help="per replica: past it Ray sends a request to a replica without its cluster or adapter")
    args = ap.parse_args(argv)
    check_workload_args(ap, args)
    if args.replicas < 1 or args.max_ongoing_requests < 1:
        ap.error("--replicas and --max-ongoing-requests must be ≥ 1")
    if bad := set(args.routings.split(",")) - set(ROUTINGS):
        ap.error(f"--routings: unknown {sorted(bad)}; expected {', '.join(ROUTINGS)}")
    return args


def replica_loads(folder: Path) -> float:
    """Cluster loads summed over every replica's server. Every server here has a budget, so one
    without the metric yet has loaded nothing (its counter appears with its first load)."""
    total = 0.0
    for f in folder.glob("*.json"):
        try:
            total += cluster_loads(json.loads(f.read_text())["port"]) or 0.0
        except OSError:
            continue  # a replica that died and was replaced
    return total


def replica_requests(folder: Path) -> dict[str, float]:
    """Requests each replica's server has finished (``vllm:request_success_total``), by replica."""
    out = {}
    for f in folder.glob("*.json"):
        info = json.loads(f.read_text())
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{info['port']}/metrics", timeout=10) as r:
                text = r.read().decode()
        except OSError:
            continue
        out[info["replica"]] = sum(float(v) for v in re.findall(r"^vllm:request_success_total\{[^}]*\} ([0-9.e+-]+)$",
                                                                text, re.M))
    return out


def measure(routing: str, model: Path, store: Path, work: Path, jobs: list[dict], arrivals: list[float], args) -> dict:
    folder = work / f"replicas-{routing}"
    folder.mkdir(exist_ok=True)
    for f in folder.glob("*.json"):
        f.unlink()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "VLLM_JD_REPLICA_DIR": str(folder)}
    env.pop("VLLM_JD_STORE", None)
    cmd = [str(Path(sys.executable).parent / "vllm-jd"), "serve-ray", str(model), "--jd-store", str(store),
           "--replicas", str(args.replicas), "--clusters-per-replica", str(args.k), "--routing", routing,
           "--max-ongoing-requests", str(args.max_ongoing_requests),
           "--host", "127.0.0.1", "--port", str(args.port), "--dtype", "bfloat16", "--max-model-len", "512",
           "--max-num-seqs", str(args.max_num_seqs)]
    log = work / f"serve-ray-{routing}.log"
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + 900
        while len(list(folder.glob("*.json"))) < args.replicas or not _healthy(args.port):
            if proc.poll() is not None or time.time() > deadline:
                sys.exit(f"serve-ray ({routing}) did not start; see {log}")
            time.sleep(1)
        startup = round(time.perf_counter() - t, 1)
        asyncio.run(send_open_loop(args.port, jobs[:16], [0.0] * 16))
        rounds = []
        for _ in range(args.rounds):
            before, served = replica_loads(folder), replica_requests(folder)
            res = asyncio.run(send_open_loop(args.port, jobs, arrivals))
            res["loads_per_1000_requests"] = round(1000 * (replica_loads(folder) - before) / len(jobs), 1)
            # the busiest replica's share of the requests: affinity's price under skewed popularity
            done = [n - served.get(r, 0.0) for r, n in replica_requests(folder).items()]
            res["busiest_replica_share"] = round(max(done) / sum(done), 3) if sum(done) else None
            rounds.append(res)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], capture_output=True, timeout=120)
    res = sorted(rounds, key=lambda r: r["requests_per_s"])[len(rounds) // 2]
    return {"startup_s": startup, **res, "rounds_requests_per_s": [r["requests_per_s"] for r in rounds],
            "rounds_loads_per_1000_requests": [r["loads_per_1000_requests"] for r in rounds],
            "rounds_busiest_replica_share": [r["busiest_replica_share"] for r in rounds]}


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
            return True
    except OSError:
        return False


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="vllm-jd-replicas-"))
    work.mkdir(parents=True, exist_ok=True)
    model, store, names, _ = build_store(work, args)
    jobs, arrivals = workload(names, args, random.Random(f"{args.seed}-{args.popularity}"))
    results = {}
    for routing in args.routings.split(","):
        results[routing] = measure(routing, model, store, work, jobs, arrivals, args)
        print(json.dumps({"bench": "replicas", "routing": routing, "replicas": args.replicas, "k": args.k,
                          "max_ongoing_requests": args.max_ongoing_requests,
                          "clusters": args.clusters, "popularity": args.popularity, "rate": args.rate,
                          **results[routing]}), flush=True)
    if set(results) == set(ROUTINGS):
        c, a = results["cluster"], results["adapter"]
        ratio = {"bench": "replicas_ratio", "requests_per_s_cluster_vs_adapter":
                 round(c["requests_per_s"] / a["requests_per_s"], 3)}
        if a["loads_per_1000_requests"]:
            ratio["loads_cluster_vs_adapter"] = round(c["loads_per_1000_requests"] / a["loads_per_1000_requests"], 3)
        print(json.dumps(ratio), flush=True)
    return 1 if any(r["errors"] for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
