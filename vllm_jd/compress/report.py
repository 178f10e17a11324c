"""``inspect``: what a store holds, its errors, its bytes and the parameters it saves."""

from __future__ import annotations

import statistics
from pathlib import Path

from vllm_jd.compress.accounting import STORE_BYTES_PER_PARAM, account
from vllm_jd.store.format import Manifest, read_manifest, shard_path
from vllm_jd.store.transaction import locked
from vllm_jd.store.validate import check_store

_ITEMSIZE = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I8": 1, "U8": 1, "I64": 8, "I32": 4, "BOOL": 1}


def stored_bytes(store: Path, manifest: Manifest) -> dict[str, int]:
    """Bytes of the store's tensors as written (headers excluded), by kind: bases (U, V and their
    int8 scales), sigma (Σ and scales); read from the shards' headers, no tensor is loaded."""
    from safetensors import safe_open

    out = {"bases": 0, "sigma": 0}
    by_shard: dict[str, list[str]] = {}
    for key, shard in manifest.weight_map.items():
        by_shard.setdefault(shard, []).append(key)
    for shard, keys in by_shard.items():
        try:
            with safe_open(str(shard_path(Path(store), shard)), framework="pt") as f:
                for key in keys:
                    sl = f.get_slice(key)
                    n = _ITEMSIZE[sl.get_dtype()]
                    for d in sl.get_shape():
                        n *= d
                    out["sigma" if key.startswith("sigma.") else "bases"] += n
        except Exception:  # an unreadable shard or tensor is counted as 0 bytes; check_store names it
            continue
    out["total"] = out["bases"] + out["sigma"]
    return out


def summarize(store: str | Path) -> dict:
    """A JSON-ready summary of ``store`` (read under its shared lock: one consistent version)."""
    with locked(store, shared=True):
        return _summarize(store)


def _summarize(store: str | Path) -> dict:
    manifest = read_manifest(store)
    found = check_store(store, manifest)
    found.set_aside(manifest)  # counted apart: their entries or tensors cannot be trusted
    acc = account(manifest)
    errors = [a.error for a in manifest.adapters.values()]
    sizes: dict[int, int] = {}
    for a in manifest.adapters.values():
        sizes[a.cluster] = sizes.get(a.cluster, 0) + 1
    kinds: dict[str, int] = {}
    for c in manifest.clusters:
        kinds[c.kind] = kinds.get(c.kind, 0) + 1
    b = STORE_BYTES_PER_PARAM
    quantised = [a for a in manifest.adapters.values() if a.error_fp32 is not None]
    added = [a.error - a.error_fp32 for a in quantised]
    return {
        "store": str(store),
        "format_version": manifest.format_version,
        "method": manifest.method,
        "sigma": manifest.sigma,
        "rank": manifest.rank,
        "base_model": manifest.base_model,
        "modules": len(manifest.modules),
        "adapters": len(manifest.adapters),
        "clusters": len(manifest.clusters),
        "cluster_kinds": kinds,
        "cluster_sizes": [sizes.get(c.id, 0) for c in manifest.clusters],
        "error": {"min": min(errors), "median": statistics.median(errors), "max": max(errors),
                  "mean": statistics.fmean(errors)} if errors else None,
        "dtypes": {"basis": manifest.basis_dtype, "sigma": manifest.sigma_dtype},
        "error_added_by_dtypes": {"mean": statistics.fmean(added), "max": max(added),
                                  "mean_before": statistics.fmean(a.error_fp32 for a in quantised)} if added else None,
        "bytes_stored": stored_bytes(Path(store), manifest),
        "compeft": _compeft(manifest),
        "bytes_per_adapter": {"sigma": (statistics.fmean(acc.sigma_params) if errors else 0) * b,
                              "cluster_id": 4},
        "bytes_per_basis": {"mean": statistics.fmean(acc.basis_params or [0]) * b, "total": sum(acc.basis_params) * b},
        "bytes_resident": sum(acc.basis_params) * b + sum(acc.sigma_params) * b + 4 * len(errors),
        "bytes_uncompressed_lora": acc.lora_params * b,
        "params_saved": {"per_adapter": statistics.fmean(acc.per_adapter_saved) if errors else 0.0,
                         "total": acc.total_saved},
        "problems": {"store": found.store, "adapters": found.adapters},
        "quarantined": {n: q.get("reason") for n, q in manifest.quarantined.items()},
        "adapter_errors": {name: a.error for name, a in manifest.adapters.items()},
        "adapter_clusters": {name: a.cluster for name, a in manifest.adapters.items()},
    }


def _compeft(manifest: Manifest) -> dict | None:
    """Sizes of the ComPEFT-coded singletons: payload bits (the paper's count) per parameter."""
    coded = [c.compeft for c in manifest.clusters if c.compeft is not None]
    if not coded:
        return None
    bits, params = sum(c.bits for c in coded), sum(c.d for c in coded)
    return {"adapters": len(coded), "params": params, "bits": bits, "bits_per_param": bits / params,
            "ratio_vs_fp16": 16 * params / bits, "encodings": sorted({c.encoding for c in coded})}


def _mib(x: float) -> str:
    return f"{x / 2**20:,.2f} MiB" if x >= 2**20 else f"{x / 1024:,.1f} KiB"


def _saved_line(saved: dict) -> str:
    """The paper's "Para. Saved" (1 − stored / LoRA parameters), and in words when negative: a store
    larger than its adapters (few adapters per basis, or exact singletons) saves nothing."""
    line = f"params saved per adapter {saved['per_adapter']:.2f} / total {saved['total']:.2f}"
    if saved["total"] < 0:
        line += (f"  (the store holds {1 - saved['total']:.2f}× the adapters' LoRA parameters: too few adapters share "
                 "each basis to save memory)")
    return line


def format_summary(s: dict, max_rows: int = 20) -> str:
    """Human-readable text of ``summarize``'s result."""
    e = s["error"]
    lines = [
        f"store        {s['store']}  (format v{s['format_version']})",
        f"method       {s['method']}  Σ {s['sigma']}  rank {s['rank']}  base model {s['base_model']}",
        f"adapters     {s['adapters']}  in {s['clusters']} clusters {s['cluster_kinds']}  over {s['modules']} modules",
        f"error        min {e['min']:.4f}  median {e['median']:.4f}  max {e['max']:.4f}" if e else "error        -",
        f"resident     {_mib(s['bytes_resident'])} (float32) vs {_mib(s['bytes_uncompressed_lora'])} of LoRAs; "
        f"per adapter {_mib(s['bytes_per_adapter']['sigma'])} Σ + 4 B cluster id; "
        f"per basis {_mib(s['bytes_per_basis']['mean'])}",
        f"stored       {_mib(s['bytes_stored']['total'])} on disk: bases {_mib(s['bytes_stored']['bases'])} "
        f"({s['dtypes']['basis']}), Σ {_mib(s['bytes_stored']['sigma'])} ({s['dtypes']['sigma']})"
        + (f"; error added by the dtypes: mean {q['mean']:.2e}, max {q['max']:.2e}"
           if (q := s["error_added_by_dtypes"]) else ""),
        *([f"ComPEFT      {c['adapters']} adapters, {c['bits_per_param']:.3f} bits/param "
           f"({c['ratio_vs_fp16']:.1f}× smaller than fp16), {'/'.join(c['encodings'])}"] if (c := s["compeft"]) else []),
        _saved_line(s["params_saved"]),
        "",
        f"{'adapter':<32} {'cluster':>7} {'error':>8}",
    ]
    names = sorted(s["adapter_errors"], key=s["adapter_errors"].get, reverse=True)
    for name in names[:max_rows]:
        lines.append(f"{name:<32} {s['adapter_clusters'][name]:>7} {s['adapter_errors'][name]:>8.4f}")
    if len(names) > max_rows:
        lines.append(f"… {len(names) - max_rows} more (worst first; --json lists all)")
    if s["quarantined"]:
        lines.append(f"quarantined  {len(s['quarantined'])} adapters (not served; `vllm-jd fsck` lists them)")
    problems = s["problems"]
    for p in problems["store"]:
        lines.append(f"PROBLEM      the store: {p}")
    for name, why in sorted(problems["adapters"].items())[:max_rows]:
        lines.append(f"PROBLEM      adapter {name}: {why}")
    if problems["store"] or problems["adapters"]:
        lines.append("             (not served; `vllm-jd fsck STORE --repair` quarantines broken adapters)")
    return "\n".join(lines)
