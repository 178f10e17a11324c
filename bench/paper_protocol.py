"""The paper's serving sweep (Compress then Serve §5.6, Figure 4): `bench/throughput.py --protocol paper`.

For N ∈ {4, 8, …, 1024} unique rank-16 adapters, each request names one of them (uniformly, or
Zipf: P(k) ∝ k^−α as S-LoRA defines it), all requests are sent at once (or with Poisson arrivals),
and three servers are measured one at a time, each started alone:

    base       the base model, no adapters (the ceiling)
    vllm-lora  vLLM's multi-LoRA with --max-loras matched to the compressed store's memory (App. E)
    jd         vllm-jd serving the store compressed with the paper's setting for that N

Paper settings (App. E): JD-Full rank 16/16/32/64/64 for N = 4/8/16/32/64, then rank 16 with
7/10/25 clusters for N = 128/256/512, and rank 64 with 7 clusters for N = 1024. Memory matching
(App. E, generalised from D×D modules to each module's d_in + d_out):

    GPU usage ratio = Σ_m [ c·r·(d_in+d_out) + N·(r² + [c > 1]) ] / Σ_m 16·(d_in+d_out)

= how many rank-16 LoRAs fit in the store's memory; vLLM gets ⌈ratio⌉ slots, at most N (never
less memory than the store has). For the paper's 4096×4096 modules this gives 2, 2, 3, 5, 6, 8,
11, 27, 61 against the paper's 2, 2, 3, 5, 6, 8, 10, 26, 60 (it rounds its last three down; no
single rounding matches all nine rows). On a tiny model Σ_i dominates (d is small), so the
matched baseline gets many more slots than on a 7B model.

One JSON line per N, then a PNG (throughput ratio against N, like Figure 4) in --out.
``--model`` takes any local model folder (Llama/Mistral layout): the same command runs
Mistral-7B on an H100 (add ``--dtype bfloat16 --adapters-dir`` with real adapters if you have them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

from servers import WORDS, send_open_loop, start, stop

PAPER_NS = [4, 8, 16, 32, 64, 128, 256, 512, 1024]


def paper_setting(n: int) -> tuple[int, int]:
    """(rank, clusters) the paper serves N unique adapters with (App. E)."""
    if n <= 8:
        return 16, 1
    if n <= 16:
        return 32, 1
    if n <= 64:
        return 64, 1
    if n <= 128:
        return 16, 7
    if n <= 256:
        return 16, 10
    if n <= 512:
        return 16, 25
    return 64, 7


def matched_max_loras(n: int, rank: int, clusters: int, modules: dict[str, tuple[int, int]]) -> tuple[int, float]:
    """(vLLM --max-loras, GPU usage ratio) giving vLLM's rank-16 slots the store's memory (App. E)."""
    assign = 1 if clusters > 1 else 0  # App. E counts a cluster id per adapter only when clustering
    store = sum(clusters * rank * (a + b) + n * (rank * rank + assign) for a, b in modules.values())
    slot = sum(16 * (a + b) for a, b in modules.values())
    ratio = store / slot
    return max(1, min(n, math.ceil(ratio - 1e-9))), ratio


def model_modules(model: Path) -> dict[str, tuple[int, int]]:
    """q/k/v module dims of a local Llama/Mistral folder; SystemExit with a reason if unusable."""
    from vllm_jd.tiny_model import llama_lora_modules

    cfg_path = model / "config.json"
    if not cfg_path.exists():
        sys.exit(f"--model {model}: no config.json (not a model folder)")
    if not any(model.glob("*.safetensors")) and not any(model.glob("*.bin")):
        sys.exit(f"--model {model}: no weights (*.safetensors or *.bin) in the folder")
    cfg = json.loads(cfg_path.read_text())
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    mods = llama_lora_modules(hidden, cfg["num_hidden_layers"], heads, cfg.get("num_key_value_heads", heads),
                              cfg.get("intermediate_size", 4 * hidden), targets=("q_proj", "k_proj", "v_proj"))
    if head_dim * heads != hidden:  # llama_lora_modules assumes hidden = heads × head_dim
        kv = cfg.get("num_key_value_heads", heads) * head_dim
        mods = {m: ((hidden, heads * head_dim) if m.endswith("q_proj") else (hidden, kv)) for m in mods}
    return mods


def parse_range(text: str, what: str) -> tuple[int, int]:
    try:
        lo, _, hi = text.partition("-")
        lo, hi = int(lo), int(hi or lo)
    except ValueError:
        sys.exit(f"--{what} {text!r}: expected N or LO-HI")
    if not 1 <= lo <= hi:
        sys.exit(f"--{what} {text!r}: expected 1 ≤ LO ≤ HI")
    return lo, hi


def workload(names: list[str], args, rng: random.Random) -> tuple[list[dict], list[float]]:
    """Jobs (adapter, prompt, max_tokens) and their arrival times for one N."""
    pop = args.popularity
    if pop == "uniform":
        weights = None
    elif pop.startswith("zipf:"):
        alpha = float(pop[5:])
        weights = [1 / (k + 1) ** alpha for k in range(len(names))]  # S-LoRA: rank k has P ∝ k^−α
    else:
        sys.exit(f"--popularity {pop!r}: expected uniform or zipf:ALPHA")
    picks = rng.choices(names, weights=weights, k=args.requests)
    ilo, ihi = parse_range(args.input_len, "input-len")
    olo, ohi = parse_range(args.output_len, "output-len")
    jobs = [{"model": m, "prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(ilo, ihi))),
             "max_tokens": rng.randint(olo, ohi)} for m in picks]
    if args.arrival == "all":
        arrivals = [0.0] * len(jobs)
    elif args.arrival.startswith("poisson:"):
        rate, t, arrivals = float(args.arrival[8:]), 0.0, []
        for _ in jobs:
            t += rng.expovariate(rate)
            arrivals.append(t)
    else:
        sys.exit(f"--arrival {args.arrival!r}: expected all or poisson:RATE")
    return jobs, arrivals


def measure(cmd: list[str], port: int, log: Path, jobs: list[dict], arrivals: list[float], rounds: int) -> dict:
    """Start a server, warm it up, run ``rounds`` rounds (median by requests/s), stop it."""
    t = time.perf_counter()
    proc = start(cmd, port, log)
    startup = time.perf_counter() - t
    try:
        asyncio.run(send_open_loop(port, jobs[:8], [0.0] * min(8, len(jobs))))
        results = [asyncio.run(send_open_loop(port, jobs, arrivals)) for _ in range(rounds)]
        died = proc.poll() is not None
    finally:
        stop(proc)
    res = sorted(results, key=lambda r: r["requests_per_s"])[len(results) // 2]
    res["startup_s"] = round(startup, 1)
    if died or res["errors"]:
        res["failure"] = f"server died or requests failed; see {log}: {log.read_text()[-1500:]}"
    return res


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench/throughput.py --protocol paper", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ns", default=",".join(map(str, PAPER_NS)), help="numbers of unique adapters")
    ap.add_argument("--model", type=Path, default=None, help="local model folder (default: a tiny bf16 Llama)")
    ap.add_argument("--adapters-dir", type=Path, default=None,
                    help="folder of PEFT adapters to draw N from (default: synthetic rank-16 adapters)")
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--input-len", default="20-28", help="prompt words, N or LO-HI (default 20-28)")
    ap.add_argument("--output-len", default="10", help="output tokens, N or LO-HI (paper: 10)")
    ap.add_argument("--popularity", default="uniform", help="uniform (paper) or zipf:ALPHA")
    ap.add_argument("--arrival", default="all", help="all (paper: sent at once) or poisson:RATE (requests/s)")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--systems", default="base,vllm-lora,jd")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=None, help="keep model/adapters/stores here (default: temporary)")
    ap.add_argument("--out", type=Path, default=Path("bench_out/paper"), help="JSON lines and the PNG go here")
    ap.add_argument("--port", type=int, default=8472)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--server-arg", action="append", default=[], help="extra argument for every server (repeat)")
    args = ap.parse_args(argv)

    try:
        ns = sorted({int(x) for x in args.ns.split(",")})
    except ValueError:
        sys.exit(f"--ns {args.ns!r}: expected comma-separated integers")
    if ns[0] < 1 or args.requests < 1:
        sys.exit("--ns and --requests must be positive")
    systems = args.systems.split(",")
    if bad := set(systems) - {"base", "vllm-lora", "jd"}:
        sys.exit(f"--systems: unknown {sorted(bad)}; expected base, vllm-lora, jd")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="vllm-jd-paper-"))
    work.mkdir(parents=True, exist_ok=True)
    model = args.model or _tiny_model(work / "model")
    modules = model_modules(model)
    min_dim = min(min(d) for d in modules.values())
    for n in ns:
        rank, clusters = paper_setting(n)
        if rank > min_dim:
            sys.exit(f"N={n}: the paper's rank {rank} is above the smallest module dimension {min_dim} of {model}")
    adapters = _adapters(args, work, modules, max(ns))
    names_all = sorted(p.name for p in adapters.iterdir() if (p / "adapter_config.json").exists())
    if len(names_all) < max(ns):
        sys.exit(f"N={max(ns)} needs {max(ns)} adapters; {adapters} has {len(names_all)}")
    workload(names_all[:1], args, random.Random(0))  # checks every workload option before any server starts

    args.out.mkdir(parents=True, exist_ok=True)
    lines_path = args.out / "paper_throughput.jsonl"
    py = sys.executable
    common = ["--host", "127.0.0.1", "--port", str(args.port), "--dtype", args.dtype, "--max-model-len", "512",
              "--max-num-seqs", str(args.max_num_seqs), *args.server_arg]
    api = [py, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    base = None
    points, failed = [], False
    for n in ns:
        rng = random.Random(args.seed * 7919 + n)
        names = names_all[:n]
        rank, clusters = paper_setting(n)
        max_loras, ratio = matched_max_loras(n, rank, clusters, modules)
        jobs, arrivals = workload(names, args, rng)
        point = {"bench": "paper_throughput", "n": n, "setting": f"JD-Full rank {rank}, {clusters} clusters",
                 "gpu_usage_ratio": round(ratio, 3), "vllm_max_loras": max_loras,
                 "popularity": args.popularity, "arrival": args.arrival, "requests": args.requests}
        if "base" in systems:
            if base is None:
                base_jobs = [{**j, "model": str(model)} for j in jobs]
                base = measure(api + common, args.port, work / "base.log", base_jobs, arrivals, args.rounds)
            point["base"] = base
        if "vllm-lora" in systems:
            cmd = api + common + ["--enable-lora", "--max-lora-rank", "16", "--max-loras", str(max_loras),
                                  "--max-cpu-loras", str(n), "--lora-modules", *[f"{a}={adapters / a}" for a in names]]
            point["vllm-lora"] = measure(cmd, args.port, work / f"vllm-lora-{n}.log", jobs, arrivals, args.rounds)
        if "jd" in systems:
            store = _store(work, adapters, names, n, rank, clusters)
            cmd = [str(Path(py).parent / "vllm-jd"), "serve", str(model), "--jd-store", str(store)] + common
            point["jd"] = measure(cmd, args.port, work / f"jd-{n}.log", jobs, arrivals, args.rounds)
        rps = {s: point[s]["requests_per_s"] for s in systems if s in point}
        if "jd" in rps and "vllm-lora" in rps:
            point["jd_vs_vllm_lora"] = round(rps["jd"] / rps["vllm-lora"], 3)
        if "jd" in rps and "base" in rps:
            point["jd_vs_base"] = round(rps["jd"] / rps["base"], 3)
        failed |= any("failure" in point[s] for s in systems if s in point)
        print(json.dumps(point), flush=True)
        points.append(point)
        with open(lines_path, "a") as f:
            f.write(json.dumps(point) + "\n")
    _plot(points, args.out / "paper_throughput.png", args)
    return 1 if failed else 0


def _tiny_model(path: Path) -> Path:
    if not (path / "config.json").exists():
        import torch

        from vllm_jd.tiny_model import make_tiny_llama

        make_tiny_llama(path, hidden=512, layers=4, heads=8, kv_heads=4, intermediate=1024, dtype=torch.bfloat16)
    return path


def _adapters(args, work: Path, modules: dict, n: int) -> Path:
    if args.adapters_dir is not None:
        if not args.adapters_dir.is_dir():
            sys.exit(f"--adapters-dir {args.adapters_dir}: not a folder")
        return args.adapters_dir
    from vllm_jd.compress.synthetic import make_adapters

    out = work / "adapters"
    have = len(list(out.iterdir())) if out.exists() else 0
    if have < n:
        make_adapters(out, n, modules, rank=16, structure="shared", seed=args.seed, alpha=32)
    return out


def _store(work: Path, adapters: Path, names: list[str], n: int, rank: int, clusters: int) -> Path:
    from vllm_jd.cli import main as cli

    store = work / f"store-{n}-r{rank}-c{clusters}"
    if not (store / "manifest.json").exists():
        src = work / f"src-{n}"
        src.mkdir(exist_ok=True)
        for a in names:
            if not (src / a).exists():
                (src / a).symlink_to((adapters / a).resolve())
        t = time.perf_counter()
        if cli(["-q", "compress", str(src), "--out", str(store), "--rank", str(rank), "--clusters", str(clusters)]) != 0:
            sys.exit(f"compressing {n} adapters failed")
        print(json.dumps({"bench": "compress", "n": n, "rank": rank, "clusters": clusters,
                          "seconds": round(time.perf_counter() - t, 1)}), flush=True)
    return store


def _plot(points: list[dict], path: Path, args) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(json.dumps({"bench": "paper_throughput_plot", "skipped": "matplotlib is not installed"}))
        return
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for key, label in (("jd_vs_vllm_lora", "vllm-jd / vLLM multi-LoRA (memory-matched)"),
                       ("jd_vs_base", "vllm-jd / base model")):
        xs = [p["n"] for p in points if key in p]
        if xs:
            ax.plot(xs, [p[key] for p in points if key in p], marker="o", label=label)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("unique adapters N")
    ax.set_ylabel("throughput ratio (requests/s)")
    ax.set_title(f"Paper protocol ({args.popularity}, arrival {args.arrival}); CPU, tiny model" if args.model is None
                 else f"Paper protocol ({args.popularity}, arrival {args.arrival}); {args.model.name}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(json.dumps({"bench": "paper_throughput_plot", "path": str(path)}))
