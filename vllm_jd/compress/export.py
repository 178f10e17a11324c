"""``export``: write one adapter of a store back as a standard PEFT LoRA adapter.

For adapter i in cluster c: ``lora_A = V_cᵀ`` (r × d_in) and ``lora_B = U_c Σ_i`` (d_out × r),
with ``lora_alpha = r`` so PEFT's scale is 1 (the scale is already folded into Σ_i). PEFT and
stock vLLM load the result; ``B A = U_c Σ_i V_cᵀ`` is exactly the store's reconstruction.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vllm_jd.compress.errors import StoreError
from vllm_jd.compress.peft_io import refuse_non_empty, write_adapter_atomic
from vllm_jd.compress.store import TensorReader, read_manifest, u_key, v_key
from vllm_jd.compress.transaction import locked
from vllm_jd.compress.validate import bad_value


def reconstruct(reader: TensorReader, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module → (lora_A [r, d_in], lora_B [d_out, r]) of adapter ``name``, float32."""
    manifest = reader.manifest
    info = manifest.adapters[name]
    out = {}
    for m, err in zip(manifest.modules, info.module_errors):
        if err is None:  # the source adapter has no update for this module
            continue
        U, V = reader.get(u_key(info.cluster, m.name)), reader.get(v_key(info.cluster, m.name))
        s = reader.sigma(name, m.name)
        B = U @ s if s.dim() == 2 else U * s
        out[m.name] = (V.T.contiguous(), B.contiguous())
    return out


def export(store: str | Path, name: str, out: str | Path) -> Path:
    """Write adapter ``name`` of ``store`` as a PEFT adapter folder ``out`` (atomic).

    ``out`` must not exist or be an empty folder, so nothing of the user's is overwritten.
    """
    store, out = Path(store), Path(out)
    with locked(store, shared=True):  # the version read is not collected while it is read
        manifest = read_manifest(store)
        if name in manifest.broken or name in manifest.quarantined:
            why = manifest.broken.get(name) or manifest.quarantined[name].get("reason")
            raise StoreError(f"adapter {name!r} of {store} cannot be exported: {why} (see `vllm-jd fsck`)")
        if name not in manifest.adapters:
            known = ", ".join(sorted(manifest.adapters)[:5])
            raise StoreError(f"no adapter named {name!r} in {store} (it has {len(manifest.adapters)}: {known}, …)")
        refuse_non_empty(out)
        factors = reconstruct(TensorReader(store, manifest), name)
    for m, (a, b) in factors.items():
        if (why := bad_value(a)) or (why := bad_value(b)):
            raise StoreError(f"adapter {name!r} of {store}: module {m} {why} (see `vllm-jd fsck`)")
    rank = manifest.clusters[manifest.adapters[name].cluster].rank
    return write_adapter_atomic(out, factors, rank, manifest.base_model)
