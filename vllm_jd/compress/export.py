"""``export``: write one adapter of a store back as a standard PEFT LoRA adapter.

For adapter i in cluster c, each module's ``ΔW_i = U_c Σ_i V_cᵀ`` is written at its own rank:
``lora_B lora_A`` is ΔW_i's SVD cut where its singular values end (an exact rank-4 singleton
exports at r = 4, not at the store's rank), or at ``rank`` when asked (a lossy truncation, its
error reported); ``lora_alpha = r`` so PEFT's scale is 1 (the scale is already in Σ_i).
``target_modules`` lists the adapted modules by full name, so an adapter that skipped layers
(``layers_to_transform``) or modules loads in PEFT without "missing adapter keys".
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from vllm_jd.compress.peft_write import refuse_non_empty, write_adapter_atomic
from vllm_jd.store.errors import StoreError
from vllm_jd.store.format import TensorReader, read_manifest, u_key, v_key
from vllm_jd.store.transaction import locked
from vllm_jd.store.validate import bad_value

logger = logging.getLogger(__name__)


def reconstruct(reader: TensorReader, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module → (lora_A [r, d_in], lora_B [d_out, r]) of adapter ``name``, float32."""
    manifest = reader.manifest
    info = manifest.adapters[name]
    out = {}
    for m, err in zip(manifest.modules, info.module_errors, strict=True):
        if err is None:  # the source adapter has no update for this module
            continue
        U, V = reader.get(u_key(info.cluster, m.name)), reader.get(v_key(info.cluster, m.name))
        s = reader.sigma(name, m.name)
        B = U @ s if s.dim() == 2 else U * s
        out[m.name] = (V.T.contiguous(), B.contiguous())
    return out


RANK_TOL = 1e-5
"""Singular values below this share of a module's largest are taken as zero (fp32 round-off)."""


def compact(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int | None = None
            ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int, float]:
    """The same updates ``B A`` at the smallest rank that holds them all (or at ``rank``): per
    module, QR of both factors and an SVD of the small core, so d × d is never formed; the
    factors as they are when that would not lower the rank. Returns
    (module → (A [k, d_in], B [d_out, k]), k, the largest relative Frobenius error of a cut)."""
    svds, worst = {}, 0.0
    for m, (a, b) in factors.items():
        qa, ra = torch.linalg.qr(a.double().T)  # A = ra.T qa.T
        qb, rb = torch.linalg.qr(b.double())  # B = qb rb
        p, sv, qt = torch.linalg.svd(rb @ ra.T)
        svds[m] = (qb @ p, sv, qt @ qa.T)  # B A = (qb p) diag(sv) (qt qa.T)
    needed = max((int((sv > RANK_TOL * sv[0]).sum()) if sv.numel() and sv[0] > 0 else 1
                  for _, sv, _ in svds.values()), default=1)
    stored = max((a.shape[0] for a, _ in factors.values()), default=1)
    if rank is None and needed >= stored:  # nothing to gain: keep the stored factors (ComPEFT's stay ternary)
        return factors, stored, 0.0
    k = needed if rank is None else min(rank, needed)  # above the adapter's own rank there is nothing to cut
    out = {}
    for m, (left, sv, right) in svds.items():
        kk = min(k, sv.numel())
        if kk < sv.numel() and sv.norm() > 0:
            worst = max(worst, float(sv[kk:].norm() / sv.norm()))
        root = sv[:kk].sqrt()
        a = torch.zeros(k, right.shape[1], dtype=torch.float64)
        b = torch.zeros(left.shape[0], k, dtype=torch.float64)
        a[:kk], b[:, :kk] = root[:, None] * right[:kk], left[:, :kk] * root
        out[m] = (a.float(), b.float())
    return out, k, worst


def export(store: str | Path, name: str, out: str | Path, rank: int | None = None) -> Path:
    """Write adapter ``name`` of ``store`` as a PEFT adapter folder ``out`` (atomic), at its own
    rank or at ``rank`` (``compact``).

    ``out`` must not exist or be an empty folder, so nothing of the user's is overwritten.
    """
    if rank is not None and rank < 1:
        raise ValueError(f"rank {rank}: expected a positive integer")
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
    factors, k, error = compact(factors, rank)
    if rank is not None and error > RANK_TOL:
        logger.warning("adapter %s cut to rank %d: relative error up to %.4f per module (on top of the store's)",
                       name, k, error)
    return write_adapter_atomic(out, factors, k, manifest.base_model)
