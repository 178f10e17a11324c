"""Parameter and byte accounting, as the paper's "Para. Saved" column defines it (§2.12).

"Para. Saved x / y" = per-adapter saved ratio / total saved ratio:
- per adapter: 1 − (what adapter i alone needs) / (its LoRA's parameters). What it alone needs is
  its Σ_i (r² for JD-Full, r for JD-Diag) on every module it has, plus its basis if the basis is its own
  (svd and exact singleton clusters; for svd the paper folds Σ_i into V_i and counts only
  r(d_in + d_out)).
- total: 1 − (all bases + all Σ_i) / (all LoRAs' parameters).
With d = 4096 and rank-16 LoRAs this reproduces the paper's cells, e.g. 10 adapters JD-Full
rank 256 → 0.50 / −1.10 (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm_jd.store.format import Manifest


@dataclass
class Accounting:
    per_adapter_saved: list[float]
    """Per-adapter saved ratio, in the manifest's adapter order."""
    total_saved: float
    lora_params: int
    basis_params: list[int]
    """Parameters of each cluster's U_c and V_c over all modules."""
    sigma_params: list[int]
    """Parameters of each adapter's Σ_i over all modules."""


def account(manifest: Manifest) -> Accounting:
    """Parameters of ``manifest``'s store against the source LoRAs it was built from.

    Only modules an adapter has count (``module_errors[m]`` not None): its Σ_i there, and a
    cluster's basis on the modules at least one member has. The store writes nothing for the rest
    (an attention-only adapter stored exactly holds no MLP basis), and counting every module would
    charge such an adapter about twice its own size.
    """
    dims = [m.d_in + m.d_out for m in manifest.modules]
    has = {n: [e is not None for e in a.module_errors] for n, a in manifest.adapters.items()}
    held: dict[int, list[bool]] = {}
    for n, a in manifest.adapters.items():
        prev = held.get(a.cluster, [False] * len(dims))
        held[a.cluster] = [x or y for x, y in zip(prev, has[n], strict=True)]
    basis = [sum(c.rank * d for d, h in zip(dims, held.get(c.id, [True] * len(dims)), strict=True) if h)
             for c in manifest.clusters]
    own_basis = {c.id for c in manifest.clusters if c.kind in ("svd", "exact", "compeft")}
    per, sig = [], []
    for n, a in manifest.adapters.items():
        r = manifest.clusters[a.cluster].rank
        s = 0 if manifest.method == "svd" else sum(has[n]) * (r * r if manifest.sigma == "full" else r)
        sig.append(s)
        own = s + (basis[a.cluster] if a.cluster in own_basis else 0)
        per.append(1 - own / a.lora_params)
    lora = sum(a.lora_params for a in manifest.adapters.values())
    used = sum(b for c, b in enumerate(basis) if c in held) + sum(sig)
    return Accounting(per, 1 - used / lora if lora else 0.0, lora, basis, sig)


STORE_BYTES_PER_PARAM = 4
"""Stores keep float32 tensors; serving casts to the model's dtype (2 bytes for bf16)."""
