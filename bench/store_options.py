"""Store size on disk, resident bytes and added error for each store option (issue: ComPEFT,
Compress-then-Merge, quantised stores), at Mistral-7B scale.

The 1,000 rank-16 Mistral-shaped q/k/v adapters of bench/compress.py, JD-Full rank 64 with 7
clusters, fitted once in float32 on ``--layers`` layers through the real pipeline; then every
option is applied to the very same fitted tensors (``quantize.encode`` for the dtypes), so the
comparison is exact and cheap. ComPEFT codes each adapter on its own (no basis). Bytes are
measured on those layers and scaled to all 32 layers (96 modules); errors are the mean over
adapters of the relative error ‖ΔW − ΔW_stored‖/‖ΔW‖ on the measured layers. One JSON line per
option, fp32 first (the baseline of the ratios).

    python bench/store_options.py [--adapters 1000] [--layers 1] [--compeft-adapters 100]

Resident bytes: serving dequantises once at load into the model dtype (bf16 here), so every
dtype option holds the same bytes on the GPU; ComPEFT singletons are decoded to dense rank-16
factors (the paper's own note: GPU memory is saved only if weights stay ternary there).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from vllm_jd.compress.compeft_store import encode_singleton
from vllm_jd.compress.factors import ModuleFactors, reconstruction_losses
from vllm_jd.compress.pipeline import compress_adapters
from vllm_jd.config import CompressConfig
from vllm_jd.store.dtypes import encode, roundtrip
from vllm_jd.store.format import TensorReader, read_manifest, sigma_key, u_key, v_key

_spec = importlib.util.spec_from_file_location("bench_compress", Path(__file__).with_name("compress.py"))
bench_compress = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_compress)

SERVE_BYTES = 2  # bf16
OPTIONS = [("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "fp16"), ("int8", "fp32"), ("fp32", "int8"), ("int8", "int8")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=1000)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--clusters", type=int, default=7)
    ap.add_argument("--compeft-adapters", type=int, default=100, help="adapters sampled for the ComPEFT rows")
    ap.add_argument("--total-layers", type=int, default=32)
    args = ap.parse_args()
    scale_up = args.total_layers / args.layers

    modules, adapters = bench_compress.mistral_adapters(args.layers, args.adapters)
    lora_bytes_fp16 = sum(a.lora_params for a in adapters) * 2 * scale_up
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        config = CompressConfig(method="jd-full", rank=args.rank, clusters=args.clusters, iters=10)
        compress_adapters(adapters, store, config, progress=False)
        fit_seconds = time.perf_counter() - t0
        m = read_manifest(store)
        reader = TensorReader(store, m)
        base_err = base_total = None
        for basis_dt, sigma_dt in OPTIONS:
            disk = {"bases": 0, "sigma": 0}
            sq = torch.zeros(len(adapters), dtype=torch.float64)
            nrm = torch.zeros(len(adapters), dtype=torch.float64)
            names = list(m.adapters)
            for mod in m.modules:
                A = torch.stack([a.factors(mod.name)[0] for a in adapters])
                Bt = torch.stack([a.factors(mod.name)[1] for a in adapters])
                f = ModuleFactors(A, Bt)
                nrm += f.norms() ** 2
                for c in m.clusters:
                    U, V = reader.get(u_key(c.id, mod.name)), reader.get(v_key(c.id, mod.name))
                    S = reader.get(sigma_key(c.id, 0, mod.name))
                    for key, x, dt, kind in (("U", U, basis_dt, "basis"), ("V", V, basis_dt, "basis"),
                                             ("S", S, sigma_dt, "sigma")):
                        nb = sum(t.numel() * t.element_size() for t in encode(key, x, dt, kind).values())
                        disk["sigma" if kind == "sigma" else "bases"] += nb
                    idx = torch.tensor([i for i, n in enumerate(names) if m.adapters[n].cluster == c.id])
                    rows = torch.tensor([m.adapters[names[i]].row for i in idx.tolist()])
                    Uq, Vq = roundtrip(U, basis_dt, "basis"), roundtrip(V, basis_dt, "basis")
                    Sq = roundtrip(S, sigma_dt, "sigma")[rows]
                    sq[idx] += reconstruction_losses(f.subset(idx), Uq, Vq, Sq)
            err = (sq / nrm).sqrt()
            base_err = err if base_err is None else base_err
            resident = sum(c.rank * (mod.d_in + mod.d_out) for c in m.clusters for mod in m.modules) * SERVE_BYTES
            resident += len(adapters) * len(m.modules) * args.rank**2 * SERVE_BYTES
            total = (disk["bases"] + disk["sigma"]) * scale_up
            base_total = base_total or total
            print(json.dumps({
                "bench": "store_option", "option": f"jd-full basis {basis_dt} sigma {sigma_dt}",
                "adapters": args.adapters, "disk_bytes_96_modules": round(total),
                "disk_bases": round(disk["bases"] * scale_up), "disk_sigma": round(disk["sigma"] * scale_up),
                "disk_ratio_vs_fp32_store": round(base_total / total, 2),
                "disk_ratio_vs_fp16_loras": round(lora_bytes_fp16 / total, 2),
                "resident_bytes_bf16_96_modules": round(resident * scale_up),
                "error_mean": round(float(err.mean()), 5),
                "error_added_mean": float(f"{float((err - base_err).mean()):.3g}"),
                "error_added_max": float(f"{float((err - base_err).abs().max()):.3g}"),
                "fit_seconds": round(fit_seconds, 1)}))
    for density, encoding, alpha in ((0.05, "golomb", 1.0), (0.1, "golomb", 1.0), (0.2, "golomb", 1.0),
                                     (0.05, "golomb", 2.0), (0.1, "golomb", 2.0), (0.2, "golomb", 2.0),
                                     (0.1, "masks", 1.0)):
        bits, errs, t1 = 0, [], time.perf_counter()
        sample = adapters[: args.compeft_adapters]
        for a in sample:
            one = encode_singleton(a, density, alpha, encoding)
            bits += one.info.bits
            num = den = 0.0
            for mod in modules:
                A, Bt = a.factors(mod)
                U, V, s = one.bases[mod]
                f = ModuleFactors(A[None], Bt[None])
                num += float(reconstruction_losses(f, U, V, torch.full((1, U.shape[1]), s))[0])
                den += float(f.norms()[0]) ** 2
            errs.append(math.sqrt(num / den))
        per_adapter = bits / 8 / len(sample) * scale_up
        dense = sum(16 * (d_in + d_out) for d_in, d_out in modules.values()) * SERVE_BYTES * scale_up
        print(json.dumps({
            "bench": "store_option", "option": f"compeft density {density} {encoding} alpha {alpha}",
            "adapters": args.adapters, "disk_bytes_96_modules": round(per_adapter * args.adapters),
            "disk_ratio_vs_fp16_loras": round(lora_bytes_fp16 / (per_adapter * args.adapters), 2),
            "resident_bytes_bf16_96_modules": round(dense * args.adapters),
            "error_mean": round(sum(errs) / len(errs), 4), "sampled_adapters": len(sample),
            "seconds_per_adapter": round((time.perf_counter() - t1) / len(sample), 3)}))


if __name__ == "__main__":
    main()
