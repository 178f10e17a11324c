"""Cluster-aware scheduling against vLLM's default rule with the same resident cluster budget.

`python bench/scheduling.py [--clusters 16] [--k 4] [--popularity uniform,zipf:1.0,zipf:0.3]`

A store of ``--clusters`` clusters (``--adapters`` synthetic rank-16 adapters with that many
planted groups on q/k/v of a tiny bf16 Llama, compressed with ``--clusters``) is served by
`vllm-jd serve --jd-max-resident-clusters K` twice, one server per policy, both up at once and
taking turns round by round:

    fcfs     vLLM's own rule (its max_loras check) with clusters in place of adapters: FCFS,
             a request is skipped only when its cluster would be the K+1-th in the batch;
             clusters load when their first request is admitted
    cluster  vllm-jd's policy: resident clusters first, aging after ``--max-wait`` seconds,
             and while an overdue request waits for a slot, busy clusters admit only
             requests that end within their window (scheduler/policy.py, rule 2)

For each popularity (over adapters: uniform, or Zipf P(k) ∝ k^−α as S-LoRA defines it) both
servers get the same requests (``--requests`` of ~24 prompt words and ``--output-len`` tokens)
at the same Poisson arrival times (``--rate`` requests/s). Reported per (popularity, policy):
requests/s, p50/p99 time to first token and latency, cluster loads per 1,000 requests (from
``/metrics``) of the median round of ``--rounds``, with the medians over rounds; then one line
per popularity with the ratios cluster / fcfs: the median of the ratios of rounds run side by side
(``paired_*``) and the ratios of the medians. One JSON line per result.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from paper_protocol import _tiny_model, model_modules, workload
from servers import send_open_loop, start, stop

POLICIES = ("fcfs", "cluster")


def workload_parser(doc: str, k: int, popularity: str, port: int) -> argparse.ArgumentParser:
    """Options shared with bench/replicas.py: the store, the budget K and the request stream."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clusters", type=int, default=16)
    ap.add_argument("--k", type=int, default=k, help="resident cluster budget (per server)")
    ap.add_argument("--adapters", type=int, default=128)
    ap.add_argument("--popularity", default=popularity)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--rate", type=float, default=60.0, help="Poisson arrivals, requests/s")
    ap.add_argument("--input-len", default="20-28")
    ap.add_argument("--output-len", default="10-30")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--port", type=int, default=port)
    ap.add_argument("--seed", type=int, default=0)
    return ap


def check_workload_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.k < 1 or args.clusters < 1 or args.adapters < args.clusters:
        ap.error("need --k ≥ 1, --clusters ≥ 1 and --adapters ≥ --clusters")
    if args.rate <= 0 or args.requests < 1 or args.rounds < 1:
        ap.error("--rate, --requests and --rounds must be positive")
    args.arrival = f"poisson:{args.rate}"


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = workload_parser(__doc__, k=4, popularity="uniform,zipf:1.0,zipf:0.3", port=8473)
    # the server's default: about one request's lifetime here (20 tokens of ~20 ms steps)
    ap.add_argument("--max-wait", type=float, default=0.5, help="the cluster policy's aging bound, seconds")
    ap.add_argument("--policies", default=",".join(POLICIES))
    args = ap.parse_args(argv)
    check_workload_args(ap, args)
    if bad := set(args.policies.split(",")) - set(POLICIES):
        ap.error(f"--policies: unknown {sorted(bad)}; expected {', '.join(POLICIES)}")
    return args


def jobs_for(names: list[str], popularity: str, args) -> tuple[list[dict], list[float]]:
    """The same requests and arrival times for every policy (seeded by popularity)."""
    ns = argparse.Namespace(**{**vars(args), "popularity": popularity})
    return workload(names, ns, random.Random(f"{args.seed}-{popularity}"))


def cluster_loads(port: int) -> float | None:
    """Sum of ``vllm_jd_cluster_loads_total`` over clusters (None if the server has no budget)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    if "# TYPE vllm_jd_cluster_loads_total" not in text:
        return None  # a server without a budget
    values = re.findall(r"^vllm_jd_cluster_loads_total\{[^}]*\} ([0-9.e+-]+)$", text, re.M)
    return sum(float(v) for v in values)  # no sample yet: nothing loaded yet


def build_store(work: Path, args) -> tuple[Path, Path, list[str], dict[str, int]]:
    from vllm_jd.cli import main as cli
    from vllm_jd.compress.synthetic import make_adapters
    from vllm_jd.store.format import read_manifest

    model = _tiny_model(work / "model")
    adapters = work / f"adapters-{args.adapters}-p{args.clusters}"
    if not adapters.exists():
        make_adapters(adapters, args.adapters, model_modules(model), rank=16, structure=f"planted:{args.clusters}",
                      seed=args.seed, alpha=32)
    store = work / f"store-{args.adapters}-c{args.clusters}"
    if not (store / "manifest.json").exists():
        if cli(["-q", "compress", str(adapters), "--out", str(store), "--rank", "16",
                "--clusters", str(args.clusters)]) != 0:
            sys.exit("compression failed")
    manifest = read_manifest(store)
    cluster_of = {n: a.cluster for n, a in manifest.adapters.items()}
    return model, store, sorted(cluster_of), cluster_of


def start_server(policy: str, port: int, model: Path, store: Path, work: Path, args):
    """Start ``vllm-jd serve`` with ``policy`` on ``port``; returns the process and its startup seconds."""
    cmd = [str(Path(sys.executable).parent / "vllm-jd"), "serve", str(model), "--jd-store", str(store),
           "--jd-max-resident-clusters", str(args.k), "--jd-scheduler-policy", policy,
           "--jd-max-wait", str(args.max_wait), "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "bfloat16", "--max-model-len", "512", "--max-num-seqs", str(args.max_num_seqs)]
    t = time.perf_counter()
    proc = start(cmd, port, work / f"{policy}.log")
    return proc, round(time.perf_counter() - t, 1)


def measure_round(port: int, jobs: list[dict], arrivals: list[float]) -> dict:
    """One round of the workload against the server on ``port``, with its cluster loads."""
    before = cluster_loads(port)
    res = asyncio.run(send_open_loop(port, jobs, arrivals))
    after = cluster_loads(port)
    res["loads_per_1000_requests"] = (round(1000 * (after - before) / len(jobs), 1)
                                      if before is not None and after is not None else None)
    return res


def measure(policies: list[str], model: Path, store: Path, work: Path, workloads: dict, args) -> dict:
    """Every policy's server up at once (an idle server takes no CPU), one full unmeasured round
    each, then ``--rounds`` rounds in which the servers take turns on every popularity (the order
    flips each round). This machine's speed drifts by ±10% over minutes; servers measured one
    after the other measured the drift as much as the policy (a first version did: the same
    policy's p99 moved 2× between starts). Returns policy → popularity → rounds."""
    procs = {}
    try:
        for i, policy in enumerate(policies):
            procs[policy] = (args.port + i, *start_server(policy, args.port + i, model, store, work, args))
        jobs, arrivals = next(iter(workloads.values()))
        for port, _, _ in procs.values():
            asyncio.run(send_open_loop(port, jobs, arrivals))  # warm-up: the first round ran ~10% slower
        out: dict = {policy: {p: [] for p in workloads} for policy in policies}
        for r in range(args.rounds):
            for popularity, (jobs, arrivals) in workloads.items():
                for policy in (policies if r % 2 == 0 else policies[::-1]):
                    port, _, startup = procs[policy]
                    out[policy][popularity].append({**measure_round(port, jobs, arrivals), "startup_s": startup})
        for policy, (_, proc, _) in procs.items():
            if proc.poll() is not None:
                sys.exit(f"the {policy} server died; see {work / (policy + '.log')}")
        return out
    finally:
        for _, proc, _ in procs.values():
            stop(proc)


def summarize(rounds: list[dict]) -> dict:
    """The median round by requests/s, with every round's requests/s and p99 TTFT, and the medians
    of p50/p99 TTFT over rounds (the median round alone hides how much p99 moves)."""
    res = dict(sorted(rounds, key=lambda r: r["requests_per_s"])[len(rounds) // 2])
    res["rounds_requests_per_s"] = [r["requests_per_s"] for r in rounds]
    res["rounds_p99_ttft_s"] = [r["p99_ttft_s"] for r in rounds]
    res["median_p99_ttft_s"] = statistics.median(res["rounds_p99_ttft_s"])
    res["median_p50_ttft_s"] = statistics.median(r["p50_ttft_s"] for r in rounds)
    res["median_requests_per_s"] = statistics.median(res["rounds_requests_per_s"])
    return res


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="vllm-jd-sched-"))
    work.mkdir(parents=True, exist_ok=True)
    model, store, names, cluster_of = build_store(work, args)
    pops = args.popularity.split(",")
    workloads = {p: jobs_for(names, p, args) for p in pops}  # checks every workload option first
    pooled = measure(args.policies.split(","), model, store, work, workloads, args)
    results = {policy: {p: summarize(r) for p, r in by_pop.items()} for policy, by_pop in pooled.items()}
    failed = False
    for p in pops:
        jobs = workloads[p][0]
        used = sorted({cluster_of[j["model"]] for j in jobs})
        top = max(sum(cluster_of[j["model"]] == c for j in jobs) for c in used) / len(jobs)
        for policy, res in results.items():
            line = {"bench": "scheduling", "popularity": p, "policy": policy, "k": args.k,
                    "clusters": len(used), "top_cluster_share": round(top, 3), "rate": args.rate, **res[p]}
            failed |= bool(line["errors"])
            print(json.dumps(line), flush=True)
        if set(results) == set(POLICIES):
            c, f = results["cluster"][p], results["fcfs"][p]
            pairs = list(zip(pooled["cluster"][p], pooled["fcfs"][p], strict=True))  # same round: side by side in time
            print(json.dumps({"bench": "scheduling_ratio", "popularity": p,
                              "paired_requests_per_s": round(statistics.median(
                                  a["requests_per_s"] / b["requests_per_s"] for a, b in pairs), 3),
                              "paired_p99_ttft": round(statistics.median(
                                  a["p99_ttft_s"] / b["p99_ttft_s"] for a, b in pairs), 3),
                              "requests_per_s_cluster_vs_fcfs": round(c["median_requests_per_s"]
                                                                      / f["median_requests_per_s"], 3),
                              "p99_ttft_cluster_vs_fcfs": round(c["median_p99_ttft_s"] / f["median_p99_ttft_s"], 3),
                              "p50_ttft_cluster_vs_fcfs": round(c["median_p50_ttft_s"] / f["median_p50_ttft_s"], 3)}),
                  flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
