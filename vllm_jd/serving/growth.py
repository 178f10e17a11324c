"""Growing the served store while serving: spare Σ rows, and new clusters appended to a layer.

Used by ``manager.JDLoRAModelManager.jd_refresh`` when adapters are added to the store after
start (``vllm-jd add``, ``/v1/load_lora_adapter``).
"""

from __future__ import annotations

import os

import torch

from vllm_jd.kernels.weights import JDLayerWeights
from vllm_jd.store.errors import StoreError
from vllm_jd.store.format import u_key, v_key


def spare_adapters() -> int:
    """Σ rows reserved at start for adapters registered while serving (``VLLM_JD_SPARE_ADAPTERS``)."""
    value = os.environ.get("VLLM_JD_SPARE_ADAPTERS", "256")
    try:
        n = int(value)
    except ValueError:
        raise StoreError(f"VLLM_JD_SPARE_ADAPTERS={value!r} is not an integer") from None
    if n < 0:
        raise StoreError(f"VLLM_JD_SPARE_ADAPTERS={n} must be ≥ 0")
    return n


def _pad(x: torch.Tensor, rank: int) -> torch.Tensor:
    """Zero-pad the last dim of a basis [d, r] to the served rank."""
    return torch.nn.functional.pad(x, (0, rank - x.shape[-1])) if x.shape[-1] < rank else x


def cluster_bases(module, names: list[str], w: JDLayerWeights, reader, fresh, placeholders: frozenset = frozenset()
                  ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The clusters ``fresh``'s bases for one layer, cut for this TP rank and padded to the served
    rank: V [S, n, d_in, R] and S tensors U [n, d_s, R], in ``w``'s dtype on ``w``'s device; zeros
    for the ids in ``placeholders`` (clusters no adapter uses: only their place is kept).
    Reads only: ``append_bases`` applies them."""
    S, R = len(w.UT), w.rank
    d_in = w.V_all.shape[0]
    V_new, U_new = [[] for _ in range(S)], [[] for _ in range(S)]
    for c in fresh:
        read = c.id not in placeholders
        full_U = [reader.get(u_key(c.id, n)) if read and reader.has(u_key(c.id, n)) else None for n in names]
        full_V = [reader.get(v_key(c.id, n)) if read and reader.has(v_key(c.id, n)) else None for n in names]
        us, vs = module.jd_shard([None if u is None else _pad(u, R)[None] for u in full_U],
                                 [None if v is None else _pad(v, R)[None] for v in full_V])
        for s in range(S):
            d_s = w.UT[s].shape[1]
            U_new[s].append(us[s][0] if us[s] is not None else torch.zeros(d_s, R))
            V_new[s].append(vs[s][0] if vs[s] is not None else torch.zeros(d_in, R))
    dt, dev = w.V_all.dtype, w.V_all.device
    return (torch.stack([torch.stack(v) for v in V_new]).to(dev, dt),
            [torch.stack(u).to(dev, dt) for u in U_new])


def new_cluster_bases(module, names: list[str], w: JDLayerWeights, reader, fresh,
                      placeholders: frozenset = frozenset()) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The clusters ``fresh``'s bases laid out like ``residency.HostBases``: V [n, d_in, S·R] and
    S tensors UT [n, R, d_s] (on the host)."""
    V, U = cluster_bases(module, names, w, reader, fresh, placeholders)
    S, n, d_in, R = V.shape
    return V.permute(1, 2, 0, 3).reshape(n, d_in, S * R).cpu(), [u.transpose(1, 2).cpu() for u in U]


def append_bases(w: JDLayerWeights, V_new: torch.Tensor, U_new: list[torch.Tensor]) -> None:
    """Append new clusters' bases (``cluster_bases``: V [S, n, d_in, R], S tensors U [n, d_s, R]) to
    one layer's weights ``w``. V_all / UT are re-laid out with the new clusters last; the object
    stays the same, so the registered op sees the new tensors."""
    S, C, R = len(w.UT), w.num_clusters, w.rank
    d_in = w.V_all.shape[0]
    V_old = w.V_all.view(d_in, C, S, R).permute(2, 1, 0, 3)  # [S, C, d_in, R]
    U_old = [ut.view(C, R, -1).transpose(1, 2) for ut in w.UT]  # [C, d_s, R]
    V = torch.cat([V_old, V_new], 1)
    U = [torch.cat([U_old[s], U_new[s]], 0) for s in range(S)]
    grown = JDLayerWeights.from_bases(V, U, w.sigma.transpose(0, 1))
    w.V_all, w.UT, w.sigma, w.num_clusters = grown.V_all, grown.UT, grown.sigma, grown.num_clusters
    w.reset_caches()
