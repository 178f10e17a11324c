"""Serving throughput: base model vs vllm-jd vs vLLM's own multi-LoRA, in one run.

Default workload (the serving issue): a tiny bf16 Llama (hidden 512, 4 layers), 1,024 rank-16
adapters on q/k/v compressed to JD-Full rank 64 with 8 clusters; 512 requests of ~24 prompt
tokens and 10 output tokens, each naming a uniformly random adapter, from 64 concurrent
clients. Each server is started alone, measured ``--rounds`` times (median reported), and stopped.
Prints one JSON line per system, then a summary line with the ratios to the base model and the
resident bytes.

    python bench/throughput.py [--adapters 1024] [--requests 512] [--concurrency 64] [--systems base,jd,jd-amx,jd-torch,vllm-lora]
    python bench/throughput.py --protocol paper [...]   (the paper's Figure 4 sweep: bench/paper_protocol.py)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_paths
from servers import WORDS, drive, start, stop

from vllm_jd.cli import main as cli
from vllm_jd.compress.synthetic import make_adapters
from vllm_jd.tiny_model import llama_lora_modules, make_tiny_llama


def main() -> None:
    if "--protocol" in sys.argv:
        i = sys.argv.index("--protocol")
        protocol = sys.argv[i + 1] if i + 1 < len(sys.argv) else ""
        if protocol == "paper":
            import paper_protocol

            return paper_protocol.main(sys.argv[1:i] + sys.argv[i + 2:])
        if protocol != "issue":
            sys.exit(f"--protocol {protocol!r}: expected 'issue' (default) or 'paper'")
        del sys.argv[i : i + 2]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=1024)
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=10)
    ap.add_argument("--rank", default="64", help="JD rank of the store, or 'auto' (compress's own pick)")
    ap.add_argument("--clusters", type=int, default=8)
    ap.add_argument("--max-loras", type=int, default=8, help="vLLM multi-LoRA slots (the baseline)")
    ap.add_argument("--systems", default="base,jd,vllm-lora")
    ap.add_argument("--workdir", type=Path, default=None, help="keep model/adapters/store here (default: temporary)")
    ap.add_argument("--port", type=int, default=8471)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cycles", type=int, default=1,
                    help="start every system this many times, in turn (base, jd, base, jd, ...), and report the "
                         "median over all their rounds: the machine's speed drifts between servers")
    ap.add_argument("--rounds", type=int, default=3,
                    help="measured rounds per server; the median is reported (this machine is noisy: ±15%% run to run)")
    ap.add_argument("--no-amx", action="store_true",
                    help="stand-in for a CPU without AMX: every server (base included) runs with "
                         "ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 and VLLM_JD_CPU_AMX=0 (vLLM's attention keeps AMX)")
    args = ap.parse_args()
    if args.rank != "auto" and not args.rank.isdigit():
        sys.exit(f"--rank {args.rank!r}: expected a positive integer or 'auto'")
    if min(args.adapters, args.requests, args.concurrency, args.cycles, args.rounds) < 1:
        sys.exit("--adapters, --requests, --concurrency, --cycles and --rounds must be positive")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="vllm-jd-bench-"))
    hidden, layers, heads, kv_heads = 512, 4, 8, 4
    model = work / "model"
    if not (model / "config.json").exists():
        import torch

        make_tiny_llama(model, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, intermediate=1024,
                        dtype=torch.bfloat16)
    modules = llama_lora_modules(hidden, layers, heads, kv_heads, targets=("q_proj", "k_proj", "v_proj"))
    adapters = work / "adapters"
    if not adapters.exists():
        make_adapters(adapters, args.adapters, modules, rank=16, structure="shared", seed=args.seed, alpha=32)
    store = work / f"store-r{args.rank}-c{args.clusters}"
    if not store.exists():
        t = time.perf_counter()
        assert cli(["-q", "compress", str(adapters), "--out", str(store), "--rank", args.rank,
                    "--clusters", str(args.clusters)]) == 0
        print(json.dumps({"bench": "compress", "seconds": round(time.perf_counter() - t, 1)}), flush=True)
    names = sorted(p.name for p in adapters.iterdir())
    rng = random.Random(args.seed)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(24)) for _ in range(args.requests)]
    picks = [rng.choice(names) for _ in range(args.requests)]
    py = sys.executable
    common = ["--host", "127.0.0.1", "--port", str(args.port), "--dtype", "bfloat16", "--max-model-len", "512",
              "--max-num-seqs", str(args.concurrency)]
    api = [py, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    systems = {
        "base": (api + common, [(str(model), p) for p in prompts]),
        "jd": ([str(Path(py).parent / "vllm-jd"), "serve", str(model), "--jd-store", str(store)] + common,
               list(zip(picks, prompts, strict=True))),
        # the same server with the fused CPU kernel off (AMX GEMMs between torch ops), and with both
        # off (torch ops only), for A/Bs in one run
        "jd-amx": ([str(Path(py).parent / "vllm-jd"), "serve", str(model), "--jd-store", str(store)] + common,
                   list(zip(picks, prompts, strict=True))),
        "jd-torch": ([str(Path(py).parent / "vllm-jd"), "serve", str(model), "--jd-store", str(store)] + common,
                     list(zip(picks, prompts, strict=True))),
        "vllm-lora": (api + common + ["--enable-lora", "--max-lora-rank", "16", "--max-loras", str(args.max_loras),
                                      "--max-cpu-loras", str(max(args.max_loras, 64)), "--lora-modules",
                                      *[f"{n}={adapters / n}" for n in names]], list(zip(picks, prompts, strict=True))),
    }
    rounds_of: dict[str, list[dict]] = {}
    every = {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16", "VLLM_JD_CPU_AMX": "0"} if args.no_amx else {}
    env = {"jd-amx": {"VLLM_JD_CPU_FUSED": "0"}, "jd-torch": {"VLLM_JD_CPU_FUSED": "0", "VLLM_JD_CPU_AMX": "0"}}
    env = {name: {**every, **env.get(name, {})} for name in systems}
    for cycle in range(args.cycles):
        for name in args.systems.split(","):
            cmd, jobs = systems[name]
            t = time.perf_counter()
            proc = start(cmd, args.port, work / f"{name}.log", env=env[name])
            startup = time.perf_counter() - t
            try:
                # warm-up: one whole unmeasured round. With 16 requests, rounds still sped up one after
                # another (base 120 → 163, vllm-jd 117 → 175 requests/s over 5 rounds)
                asyncio.run(drive(args.port, jobs, args.concurrency, args.max_tokens))
                rounds = [asyncio.run(drive(args.port, jobs, args.concurrency, args.max_tokens))
                          for _ in range(args.rounds)]
            finally:
                stop(proc)
            rounds_of.setdefault(name, []).extend(rounds)
            res = sorted(rounds, key=lambda r: r["requests_per_s"])[len(rounds) // 2]  # the median round
            print(json.dumps({"bench": "throughput", "system": name, "cycle": cycle, "startup_s": round(startup, 1),
                              **res, "rounds_requests_per_s": [r["requests_per_s"] for r in rounds]}), flush=True)
    # over all cycles: the median round of each system
    results = {name: sorted(rs, key=lambda r: r["requests_per_s"])[len(rs) // 2] for name, rs in rounds_of.items()}
    from vllm_jd.store.format import read_manifest

    rank = read_manifest(store).rank
    summary = {"bench": "throughput_summary", "adapters": args.adapters, "rank": rank, "rank_arg": args.rank,
               "clusters": args.clusters, "no_amx_stand_in": args.no_amx,
               "cycles": args.cycles, "rounds": args.rounds,
               **{f"{name}_requests_per_s": res["requests_per_s"] for name, res in results.items()}}
    if "base" in results:
        for name, res in results.items():
            summary[f"{name}_vs_base"] = round(res["requests_per_s"] / results["base"]["requests_per_s"], 3)
    summary.update(resident_bytes(store, modules, args.max_loras))
    summary.update(cpu_paths(rank, modules, amx_allowed=not args.no_amx))
    print(json.dumps(summary), flush=True)


def resident_bytes(store: Path, modules: dict[str, tuple[int, int]], max_loras: int) -> dict:
    """Bytes vllm-jd keeps resident (bf16) against what vLLM's ``max_loras`` rank-16 slots take."""
    from vllm_jd.serving.bank import load_bank

    bank = load_bank(store)
    b = {k: v // 2 for k, v in bank.resident_bytes().items()}  # loaded as float32 here; served in bf16
    slots = sum(max_loras * 16 * (d_in + d_out) * 2 for d_in, d_out in modules.values())
    return {"jd_bases_bytes": b["bases"], "jd_sigma_bytes": b["sigma"], "jd_total_bytes": b["bases"] + b["sigma"],
            "vllm_lora_slot_bytes": slots, "adapters_resident_jd": len(bank.names), "adapters_resident_vllm": max_loras}


if __name__ == "__main__":
    main()
