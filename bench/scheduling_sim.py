"""The scheduling policies in a simulated server, free of this machine's noise.

`python bench/scheduling_sim.py [--seeds 8] [--k 4] [--clusters 16] [--rate 60[,20,...]] [--max-wait 1]`

bench/scheduling.py measures the real server, but there one round's requests/s moves by ±10%
and its p99 TTFT by up to 2×, so a few % between policies cannot be told apart. Here the same
workload (``--requests`` Poisson arrivals at each ``--rate``, 10–30 output tokens, popularity over
128 adapters, adapter a in cluster a mod C) runs through the policy functions themselves
(``vllm_jd.scheduler.policy``) in a model of one vLLM engine: each step runs every running
request one token and admits what the plan says (at most ``--max-num-seqs`` running, at most
K clusters resident), and costs

    step seconds = A + B · running requests + C · prompt tokens prefilled

with A = 10 ms, B = 0.5 ms, C = 0.04 ms: the tiny bf16 Llama's server on this machine (the
base model's 160 requests/s at 64 clients and 10 tokens; 55 requests/s and 0.1 s p99 TTFT
with all 16 clusters resident in bench/scheduling.py). Loads cost nothing, as on CPU.

Policies: ``fcfs`` (vLLM's max_loras rule on clusters), ``cluster`` (vllm-jd's, with the window
rule, as the server runs it), ``cluster-nowindow`` (the same without windows: what the window
rule adds), ``unbounded`` (K = C: what the budget costs). One JSON line per (popularity,
policy, rate) with the mean over ``--seeds`` workloads, then the ratios to ``fcfs`` (mean, and
the worst seed).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vllm_jd.scheduler.policy import WINDOW_SLACK, Request, plan_fcfs, plan_step  # noqa: E402

POLICIES = ("fcfs", "cluster", "cluster-nowindow", "unbounded")
STEP_A, STEP_B, STEP_C = 0.010, 0.0005, 0.00004


def workload(popularity: str, requests: int, rate: float, clusters: int, seed: int, adapters: int = 128):
    """(id, cluster, arrival s, output tokens, prompt tokens) in arrival order."""
    rng = random.Random(f"{seed}-{popularity}")
    if popularity == "uniform":
        weights = [1.0] * adapters
    elif popularity.startswith("zipf:"):
        weights = [1 / (k + 1) ** float(popularity[5:]) for k in range(adapters)]  # S-LoRA's Zipf
    else:
        raise ValueError(f"popularity {popularity!r}: expected uniform or zipf:ALPHA")
    t, jobs = 0.0, []
    for i in range(requests):
        t += rng.expovariate(rate)
        adapter = rng.choices(range(adapters), weights)[0]
        jobs.append((f"r{i}", adapter % clusters, t, rng.randint(10, 30), rng.randint(20, 28) + 2))
    return jobs


def simulate(policy: str, jobs: list[tuple], k: int, max_wait: float, max_num_seqs: int = 64) -> dict:
    """Run ``jobs`` through one simulated engine under ``policy``; requests/s, TTFT, batch, loads.

    Checks as it goes: at most K clusters resident and in a step, FCFS within a cluster."""
    by_id = {j[0]: j for j in jobs}
    now, nxt = 0.0, 0
    waiting: list[Request] = []
    running: list[list] = []  # [cluster, tokens left, id]
    resident: set[int] = set()
    last_used: dict[int, float] = {}
    ttft: dict[str, float] = {}
    finished, loads, steps, batch, widest = 0, 0, 0, 0, 0
    last_admitted: dict[int, float] = {}  # cluster → arrival of its latest admitted request
    while finished < len(jobs):
        while nxt < len(jobs) and jobs[nxt][2] <= now:
            rid, c, arrival, out, _ = jobs[nxt]
            waiting.append(Request(rid, c, arrival, out))
            nxt += 1
        if not waiting and not running:
            now = jobs[nxt][2]
            continue
        counts: dict[int, int] = {}
        tails: dict[int, int] = {}
        for c, left, _ in running:
            counts[c] = counts.get(c, 0) + 1
            tails[c] = max(tails.get(c, 0), left)
            last_used[c] = now
        budget = max_num_seqs - len(running)
        if policy == "fcfs":
            plan = plan_fcfs(waiting, counts, resident, k, last_used, budget)
        else:
            plan = plan_step(waiting, counts, resident, set(), k, now, max_wait, budget, admit_on_load=True,
                             tails=None if policy == "cluster-nowindow" else tails, slack=WINDOW_SLACK)
        resident = (resident - set(plan.evict)) | set(plan.load)
        loads += len(plan.load)
        assert len(resident) <= k, plan
        admitted = set(plan.admit)
        prefill = 0
        for r in waiting:
            if r.id in admitted:
                assert r.arrival >= last_admitted.get(r.cluster, 0.0), f"FCFS within cluster {r.cluster} broken"
                last_admitted[r.cluster] = r.arrival
                running.append([r.cluster, by_id[r.id][3], r.id])
                prefill += by_id[r.id][4]
        waiting = [r for r in waiting if r.id not in admitted]
        widest = max(widest, len({c for c, _, _ in running}))
        assert widest <= k
        now += STEP_A + STEP_B * len(running) + STEP_C * prefill
        steps, batch = steps + 1, batch + len(running)
        for r in running:
            if r[1] == by_id[r[2]][3]:
                ttft[r[2]] = now - by_id[r[2]][2]
            r[1] -= 1
        finished += sum(r[1] == 0 for r in running)
        running = [r for r in running if r[1] > 0]
    t = sorted(ttft.values())
    return {"requests_per_s": len(jobs) / (now - jobs[0][2]), "p50_ttft_s": t[len(t) // 2],
            "p99_ttft_s": t[int(0.99 * len(t)) - 1], "mean_batch": batch / steps,
            "loads_per_1000_requests": 1000 * loads / len(jobs), "served": len(ttft),
            "max_clusters_in_a_step": widest}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clusters", type=int, default=16)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--rate", default="60", help="Poisson arrivals, requests/s; a comma list runs each")
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--max-wait", type=float, default=1.0)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--popularity", default="uniform,zipf:1.0,zipf:0.3")
    args = ap.parse_args(argv)
    try:
        rates = [float(r) for r in args.rate.split(",")]
    except ValueError:
        ap.error(f"--rate {args.rate!r}: expected numbers separated by commas")
    if args.k < 1 or args.clusters < args.k or args.seeds < 1 or args.requests < 1 or min(rates) <= 0 \
            or args.max_wait <= 0:
        ap.error("need 1 ≤ --k ≤ --clusters and positive --seeds, --requests, --rate, --max-wait")
    for rate, pop in ((r, p) for r in rates for p in args.popularity.split(",")):
        runs = {p: [] for p in POLICIES}
        for seed in range(args.seeds):
            jobs = workload(pop, args.requests, rate, args.clusters, seed)
            for p in POLICIES:
                k = args.clusters if p == "unbounded" else args.k
                runs[p].append(simulate("fcfs" if p == "unbounded" else p, jobs, k, args.max_wait))
        for p, rs in runs.items():
            line = {"bench": "scheduling_sim", "popularity": pop, "policy": p,
                    "k": args.clusters if p == "unbounded" else args.k, "rate": rate, "max_wait": args.max_wait,
                    "seeds": args.seeds}
            line |= {key: round(statistics.mean(r[key] for r in rs), 3) for key in rs[0]}
            print(json.dumps(line), flush=True)
        for p in POLICIES[1:]:
            ratios = [(r, f) for r, f in zip(runs[p], runs["fcfs"], strict=True)]
            print(json.dumps({"bench": "scheduling_sim_ratio", "popularity": pop, "rate": rate, "policy": p, "vs": "fcfs",
                              "requests_per_s": round(statistics.mean(r["requests_per_s"] / f["requests_per_s"]
                                                                      for r, f in ratios), 3),
                              "min_requests_per_s": round(min(r["requests_per_s"] / f["requests_per_s"]
                                                              for r, f in ratios), 3),
                              "p99_ttft": round(statistics.mean(r["p99_ttft_s"] / f["p99_ttft_s"] for r, f in ratios), 3),
                              "max_p99_ttft": round(max(r["p99_ttft_s"] / f["p99_ttft_s"] for r, f in ratios), 3)}),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
