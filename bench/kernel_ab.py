"""Two builds of the fused CPU kernel, timed in turn on the same layers: a git revision's
``vllm_jd/kernels/jd_fused_cpu.c`` against the working tree's (kernel work is judged by A/B
ratios in one run: this machine's speed drifts by tens of percent within a minute); each build
gets the bases laid out by its own revision's ``FusedBases``. With
``--padded-rank P`` instead: the tree's kernel on the layers zero-padded to rank P (the "old"
side: how a store of ``--rank`` was served before the kernel took it) against the layers as they are.

The layer and mixes are ``bench/jd_lora_layer.py``'s (bf16 q/k/v of hidden 512, 1,024 adapters,
8 clusters, 4 layers with new adapters every step), JD-Full Σ. Both builds must take the same
C arguments. Checks that both write bit-identical y. One JSON line per variant and mix.

    python bench/kernel_ab.py --old-rev HEAD~1 [--rank 64] [--isas amx,avx512bf16]
    python bench/kernel_ab.py --padded-rank 32 --rank 16 --isas amx
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
from jd_lora_layer import MIXES, best_interleaved, vllm_gemm
from machine import machine

from vllm_jd.kernels import jd_fused_cpu
from vllm_jd.kernels.metadata import build_meta
from vllm_jd.kernels.weights import JDLayerWeights
from vllm_jd.testing.cases import random_layer, token_rows


def compiled(source: Path, isa: str, out_dir: Path):
    """The kernel entry point of ``source`` built for variant ``isa`` (as the server builds it) in ``out_dir``."""
    fn = ctypes.CDLL(str(jd_fused_cpu.build(isa, out_dir, source))).jd_fused_bf16
    fn.restype = ctypes.c_int
    fn.argtypes = jd_fused_cpu.ARGTYPES
    return fn


def launcher_at(repo: Path, rev: str) -> types.ModuleType:
    """Revision ``rev``'s ``jd_fused_cpu.py`` as a module: its ``FusedBases`` lays out the bases
    the way that revision's kernel reads them."""
    text = subprocess.run(["git", "-C", str(repo), "show", f"{rev}:vllm_jd/kernels/jd_fused_cpu.py"],
                          check=True, capture_output=True, text=True).stdout
    module = types.ModuleType("jd_fused_cpu_old")
    module.__file__ = jd_fused_cpu.__file__  # its _SOURCE: unused here (the old .c is built from git)
    exec(compile(text, f"{rev}:jd_fused_cpu.py", "exec"), module.__dict__)
    return module


def run_layer(fn, x, y, w: JDLayerWeights, bases, order) -> None:
    sig = w.sigma.transpose(-1, -2)
    rc = fn(x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0), bases.Vp.data_ptr(), bases.Up.data_ptr(),
            sig.data_ptr(), 0, order.tok.ctypes.data, order.row.ctypes.data, order.cstart.ctypes.data,
            w.num_clusters, x.shape[1], len(w.UT), w.rank, y.shape[1], bases.n_slice.ctypes.data, torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"kernel returned {rc}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old-rev", help="git revision whose jd_fused_cpu.c is the baseline")
    ap.add_argument("--padded-rank", type=int, help="baseline: the tree's kernel on the layers zero-padded to this rank")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--isas", default=None, help="variants (default: every one this CPU runs)")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    if (args.old_rev is None) == (args.padded_rank is None):
        ap.error("give one of --old-rev and --padded-rank")
    torch.set_num_threads(1)
    repo = Path(__file__).resolve().parents[1]
    tmp = Path(tempfile.mkdtemp())
    old_src = tmp / "old.c"
    old_src.write_text(jd_fused_cpu._SOURCE.read_text() if args.padded_rank else subprocess.run(
        ["git", "-C", str(repo), "show", f"{args.old_rev}:vllm_jd/kernels/jd_fused_cpu.c"],
        check=True, capture_output=True, text=True).stdout)
    d_in, d_out, dt, N, C = 512, [512, 256, 256], torch.bfloat16, 1024, 8
    isas = args.isas.split(",") if args.isas else [i for i in jd_fused_cpu.ISAS if jd_fused_cpu.runs_here(i)]
    old_launcher = jd_fused_cpu if args.padded_rank else launcher_at(repo, args.old_rev)
    made = [random_layer(3, C, N, args.rank, d_in, d_out, False, dt, i)[:3] for i in range(4)]
    layers = [JDLayerWeights.from_bases(*m) for m in made]
    extra = (args.padded_rank or args.rank) - args.rank
    pad = lambda t, dims: torch.nn.functional.pad(t, [0, extra] * dims)  # noqa: E731
    old_layers = [JDLayerWeights.from_bases(pad(V, 1), [pad(u, 1) for u in U], pad(sigma, 2)) for V, U, sigma in made]
    gemms = [vllm_gemm((torch.randn(sum(d_out), d_in) / d_in**0.5).to(dt)) for _ in layers]
    cluster = np.random.default_rng(0).integers(0, C, N + 1)
    for isa in isas:
        old = compiled(old_src, isa, tmp)
        new = compiled(jd_fused_cpu._SOURCE, isa, tmp)
        old_bases = [old_launcher.FusedBases(w.V_all, w.UT, w.num_clusters, w.rank, isa) for w in old_layers]
        new_bases = [jd_fused_cpu.FusedBases(w.V_all, w.UT, w.num_clusters, w.rank, isa) for w in layers]
        for mix, (seqs, lens) in MIXES.items():
            metas = [build_meta(token_rows("uniform", seqs, lens, N, 0.0, k), cluster, N) for k in range(12)]
            x = torch.randn(metas[0].num_tokens, d_in).to(dt)
            y = torch.zeros(metas[0].num_tokens, sum(d_out), dtype=dt)

            def timed(fn, ws, bases, x=x, y=y, metas=metas):
                def run():
                    for meta in metas:
                        for w, b in zip(ws, bases, strict=True):
                            run_layer(fn, x, y, w, b, meta.cluster_order(C))
                return run

            def base(x=x, metas=metas):
                for _ in metas:
                    for gemm in gemms:
                        gemm(x)

            y_old, y_new = y.clone(), y.clone()
            run_layer(old, x, y_old, old_layers[0], old_bases[0], metas[0].cluster_order(C))
            run_layer(new, x, y_new, layers[0], new_bases[0], metas[0].cluster_order(C))
            base_ms, old_ms, new_ms = (ms / (len(metas) * len(layers))
                                       for ms in best_interleaved([base, timed(old, old_layers, old_bases), timed(new, layers, new_bases)],
                                                                  args.repeats))
            print(json.dumps({"bench": "kernel_ab", **machine(), "isa": isa, "rank": args.rank, "mix": mix,
                              "old_rev": args.old_rev, "old_padded_rank": args.padded_rank, "base_gemm_ms": round(base_ms, 3), "old_ms": round(old_ms, 3),
                              "new_ms": round(new_ms, 3), "new_vs_old": round(new_ms / old_ms, 3),
                              "bit_identical": bool(torch.equal(y_old, y_new))}), flush=True)


if __name__ == "__main__":
    main()
