"""Compression speed and memory at Mistral-7B scale (issue: offline compression).

1,000 rank-16 adapters on q/k/v with Mistral-7B's shapes (q 4096→4096, k and v 4096→1024) that
share structure like trained adapters (a common rank-32 component plus noise), JD-Full rank 64,
7 clusters, 10 iterations, through the real pipeline (`compress_adapters`). Adapters are
generated in memory, deterministically per (adapter, module), so no 25 GB of files are needed;
generation time is reported apart. Prints one JSON line per measured module and one summary
line with the extrapolation to all 96 modules of a 32-layer model.

    python bench/compress.py [--adapters 1000] [--layers 2] [--rank 64] [--clusters 7]
    python bench/compress.py --full       # all 96 modules, measured end to end (no extrapolation)
    python bench/compress.py --vs-bare    # one module: `vllm-jd compress` against a bare JD-Full loop
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch
from machine import machine

from vllm_jd.compress.peft_io import ModuleSpec
from vllm_jd.compress.pipeline import compress_adapters
from vllm_jd.config import CompressConfig

HIDDEN, KV = 4096, 1024
GEN_SECONDS = [0.0]


class SyntheticAdapter:
    """PeftAdapter's interface over factors generated on demand (B_i = U₀X_i + ε, A_i = Y_iV₀ᵀ + ε)."""

    def __init__(self, index: int, modules: dict[str, tuple[int, int]], common: dict, rank: int, noise: float):
        self.name, self.path, self.index = f"syn-{index:05d}", Path(f"<synthetic {index}>"), index
        self.modules = {m: ModuleSpec("a", "b", rank, d_in, d_out, 2.0) for m, (d_in, d_out) in modules.items()}
        self.common, self.rank, self.noise = common, rank, noise
        self.lora_params = sum(rank * (a + b) for a, b in modules.values())
        self.base_model = "mistral-7b-shaped"

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        t = time.perf_counter()
        g = torch.Generator().manual_seed(hash((self.index, module)) & 0x7FFFFFFF)
        U0, V0 = self.common[module]
        q = U0.shape[1]
        a = torch.randn(self.rank, q, generator=g) @ V0.T + self.noise * torch.randn(self.rank, V0.shape[0], generator=g)
        bt = (U0 @ torch.randn(q, self.rank, generator=g)).T + self.noise * torch.randn(self.rank, U0.shape[0], generator=g)
        GEN_SECONDS[0] += time.perf_counter() - t
        return a.contiguous(), (2.0 * bt).contiguous()

    def checksum(self) -> str:
        return f"synthetic:{self.index}"


def mistral_adapters(layers: int, n: int, noise: float = 0.5 / 64, rank: int = 16
                     ) -> tuple[dict[str, tuple[int, int]], list[SyntheticAdapter]]:
    """q/k/v modules of ``layers`` Mistral-7B layers and ``n`` synthetic adapters on them that share
    a rank-32 component per module (the workload of this file, reused by other benchmarks)."""
    modules = {}
    for layer in range(layers):
        for proj, d_out in (("q_proj", HIDDEN), ("k_proj", KV), ("v_proj", KV)):
            modules[f"model.layers.{layer}.self_attn.{proj}"] = (HIDDEN, d_out)
    g = torch.Generator().manual_seed(0)
    common = {m: (torch.linalg.qr(torch.randn(d_out, 32, generator=g)).Q, torch.linalg.qr(torch.randn(d_in, 32, generator=g)).Q)
              for m, (d_in, d_out) in modules.items()}
    return modules, [SyntheticAdapter(i, modules, common, rank, noise) for i in range(n)]


def bare_loop(folder: Path, out: Path, rank: int = 64, iters: int = 10) -> None:
    """A straightforward JD-Full over the PEFT adapters in ``folder`` (one module each): read the
    factors, scale and normalise each update, randomised top-subspace start (2 power steps), then
    ``iters`` Gauss–Seidel subspace iterations; write U, V, Σ. The reference for ``--vs-bare``:
    what any JD-Full must do, with none of the store's work (validation, checksums, errors)."""
    from safetensors.torch import load_file, save_file

    A, Bt = [], []
    for d in sorted(p for p in folder.iterdir() if p.is_dir()):
        cfg = json.loads((d / "adapter_config.json").read_text())
        t = load_file(str(d / "adapter_model.safetensors"))
        a = next(v for k, v in t.items() if "lora_A" in k).float()
        b = next(v for k, v in t.items() if "lora_B" in k).float()
        A.append(a)
        Bt.append((cfg["lora_alpha"] / cfg["r"]) * b.T)
    A, Bt = torch.stack(A), torch.stack(Bt)  # [n, r, d_in], [n, r, d_out]
    norms = ((Bt @ Bt.transpose(1, 2)) * (A @ A.transpose(1, 2))).sum((1, 2)).sqrt()
    A = A / norms[:, None, None]
    n, r = A.shape[:2]
    A2, B2 = A.reshape(n * r, -1), Bt.reshape(n * r, -1)
    orth = lambda x: torch.linalg.qr(x).Q  # noqa: E731
    g = torch.Generator().manual_seed(0)
    U, V = orth(torch.randn(B2.shape[1], rank, generator=g)), orth(torch.randn(A2.shape[1], rank, generator=g))
    ga, gb = A @ A.transpose(1, 2), Bt @ Bt.transpose(1, 2)
    for _ in range(2):
        U = orth(B2.T @ (ga @ (B2 @ U).view(n, r, rank)).view(n * r, rank))
        V = orth(A2.T @ (gb @ (A2 @ V).view(n, r, rank)).view(n * r, rank))
    bu, av = (B2 @ U).view(n, r, rank), (A2 @ V).view(n, r, rank)
    sigma = bu.transpose(1, 2) @ av
    for _ in range(iters):
        U = orth(B2.T @ (av @ sigma.transpose(1, 2)).view(n * r, rank))
        bu = (B2 @ U).view(n, r, rank)
        sigma = bu.transpose(1, 2) @ av
        V = orth(A2.T @ (bu @ sigma).view(n * r, rank))
        av = (A2 @ V).view(n, r, rank)
        sigma = bu.transpose(1, 2) @ av
    save_file({"U": U.contiguous(), "V": V.contiguous(), "sigma": (sigma * norms[:, None, None]).contiguous()},
              str(out))


def vs_bare(n: int = 1000, rounds: int = 2) -> None:
    """Whole-process time of ``vllm-jd compress --rank 64 --clusters 1 --iters 10`` on ``n``
    rank-16 adapters of one 4096→1024 module against ``bare_loop`` on the same files, alternating
    ``rounds`` times (best of each); one JSON line."""
    import subprocess
    import sys

    from vllm_jd.compress.synthetic import make_adapters

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "adapters"
        make_adapters(folder, n, {"model.layers.0.self_attn.k_proj": (HIDDEN, KV)}, rank=16, structure="shared")
        ours = [sys.executable, "-m", "vllm_jd.cli", "-q", "compress", str(folder), "--out", str(Path(tmp) / "s"),
                "--method", "jd-full", "--rank", "64", "--clusters", "1", "--iters", "10"]
        bare = [sys.executable, __file__, "--bare-loop", str(folder)]
        best = {"vllm_jd": float("inf"), "bare": float("inf")}
        for _ in range(rounds):
            for name, cmd in (("vllm_jd", ours), ("bare", bare)):
                t = time.perf_counter()
                subprocess.run(cmd, check=True, capture_output=True)
                best[name] = min(best[name], time.perf_counter() - t)
                if name == "vllm_jd":
                    import shutil

                    shutil.rmtree(Path(tmp) / "s")
    print(json.dumps({"bench": "compress_vs_bare", "adapters": n, "module": "4096→1024", "rank": 64, "clusters": 1,
                      "iters": 10, "vllm_jd_seconds": round(best["vllm_jd"], 2), "bare_seconds": round(best["bare"], 2),
                      "ratio": round(best["vllm_jd"] / best["bare"], 3), "goal_ratio": 1.3,
                      "threads": torch.get_num_threads()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=1000)
    ap.add_argument("--layers", type=int, default=2, help="layers actually compressed (3 modules each)")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--clusters", type=int, default=7)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--noise", type=float, default=0.5)
    ap.add_argument("--total-modules", type=int, default=96, help="modules of the full model, for extrapolation")
    ap.add_argument("--full", action="store_true", help="all 32 layers (96 modules), measured end to end")
    ap.add_argument("--vs-bare", action="store_true", help="`vllm-jd compress` on one module against a bare JD-Full loop")
    ap.add_argument("--bare-loop", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bare_loop is not None:
        return bare_loop(args.bare_loop, args.bare_loop.parent / "bare.safetensors")
    if args.vs_bare:
        return vs_bare(args.adapters)
    if args.full:
        args.layers = args.total_modules // 3

    modules, adapters = mistral_adapters(args.layers, args.adapters, args.noise / 64)
    config = CompressConfig(method="jd-full", rank=args.rank, clusters=args.clusters, iters=args.iters)
    with tempfile.TemporaryDirectory() as tmp:
        s = compress_adapters(adapters, Path(tmp) / "store", config, progress=False)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    errors = sorted(a.error for a in s.manifest.adapters.values())
    for m, sec in zip(s.manifest.modules, s.module_seconds, strict=True):
        print(json.dumps({"bench": "compress_module", "module": m.name, "d_in": m.d_in, "d_out": m.d_out,
                          "seconds": round(sec, 2)}))
    q = [t for m, t in zip(s.manifest.modules, s.module_seconds, strict=True) if m.name.endswith("q_proj")]
    kv = [t for m, t in zip(s.manifest.modules, s.module_seconds, strict=True) if not m.name.endswith("q_proj")]
    per_layer = sum(q) / len(q) + 2 * sum(kv) / len(kv)
    extrapolated = s.select_seconds + per_layer * args.total_modules / 3
    print(json.dumps({
        "bench": "compress", "adapters": args.adapters, "rank": args.rank, "clusters": args.clusters,
        "iters": args.iters, "modules_run": len(modules), "select_seconds": round(s.select_seconds, 1),
        **{f"{k}_seconds": round(v, 1) for k, v in (s.phase_seconds or {}).items()},
        **machine(), "threads": torch.get_num_threads(),
        "seconds_per_module_q": round(sum(q) / len(q), 2), "seconds_per_module_kv": round(sum(kv) / len(kv), 2),
        "generation_seconds": round(GEN_SECONDS[0], 1), "total_seconds": round(s.seconds, 1),
        "extrapolated_seconds_96_modules": round(extrapolated, 1), "goal_seconds": 360,
        "peak_rss_gb": round(peak_gb, 2), "goal_rss_gb": 4.0,
        "error_median": round(errors[len(errors) // 2], 4), "error_max": round(errors[-1], 4),
        "cluster_sizes": sorted((sum(a.cluster == c.id for a in s.manifest.adapters.values()) for c in s.manifest.clusters), reverse=True),
        "rounds_tried": s.tried,
    }))


if __name__ == "__main__":
    main()
