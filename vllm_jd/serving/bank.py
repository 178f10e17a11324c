"""A store loaded for serving: every basis and every Σ_i as dense device tensors.

No vLLM import here. Layout, per store module m (C clusters, N adapters, R = largest cluster
rank; smaller clusters are zero-padded, which changes no product):

    U[m]      [C, d_out, R]   expand weights
    V[m]      [C, d_in, R]    shrink weights
    sigma[m]  [N + 1, R, R]   (full) or [N + 1, R] (diag); row N is all zeros = "no adapter"
    cluster   [N + 1] long    cluster of each adapter row (row N → 0, harmless: Σ is zero)

Activating an adapter is then a table lookup (name → row); nothing is copied per request.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vllm_jd.store.errors import StoreError
from vllm_jd.store.format import Manifest, TensorReader, read_manifest, sigma_key, u_key, v_key
from vllm_jd.store.transaction import locked
from vllm_jd.store.validate import bad_rows, bad_value, check_store

logger = logging.getLogger(__name__)


@dataclass
class Bank:
    """Everything a server needs from a store, on one device and in one dtype."""

    store: Path
    manifest: Manifest
    names: list[str]
    """Adapter names; adapter ``names[i]`` owns Σ row i."""
    rows: dict[str, int]
    rank: int
    cluster: torch.Tensor
    U: dict[str, torch.Tensor] = field(default_factory=dict)
    V: dict[str, torch.Tensor] = field(default_factory=dict)
    sigma: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def none_row(self) -> int:
        return len(self.names)

    @property
    def num_clusters(self) -> int:
        return len(self.manifest.clusters)

    @property
    def diag(self) -> bool:
        return self.manifest.sigma == "diag"

    def module_dims(self) -> dict[str, tuple[int, int]]:
        return {m.name: (m.d_in, m.d_out) for m in self.manifest.modules}

    def resident_bytes(self) -> dict[str, int]:
        """Bytes held for bases (U, V) and for Σ over all modules."""
        nb = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
        return {"bases": nb(self.U.values()) + nb(self.V.values()), "sigma": nb(self.sigma.values()),
                "cluster_ids": self.cluster.numel() * self.cluster.element_size()}


def load_bank(store: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
              modules: list[str] | None = None, rank_policy=None) -> Bank:
    """Load ``store`` (all modules, or only ``modules``) into dense tensors on ``device``.
    ``rank_policy(rank, dims)`` may raise the served rank R above the store's (zero-padded:
    no product changes), e.g. to a rank the fused CPU kernel takes."""
    store = Path(store)
    with locked(store, shared=True):  # no shard is collected under us
        return _load(store, device, dtype, modules, rank_policy)


def _load(store: Path, device, dtype: torch.dtype, modules: list[str] | None, rank_policy=None) -> Bank:
    manifest = read_manifest(store)
    found = check_store(store, manifest, values=False)  # values are checked below, as they are loaded
    found.refuse_store(store)
    found.set_aside(manifest)
    reader = TensorReader(store, manifest)
    names = list(manifest.adapters)
    rows = {n: i for i, n in enumerate(names)}
    C, N = len(manifest.clusters), len(names)
    R = max((c.rank for c in manifest.clusters), default=1)
    if rank_policy is not None and (padded := rank_policy(R, [(m.d_in, m.d_out) for m in manifest.modules])) != R:
        logger.info("serving the rank-%d store %s at rank %d (zero-padded) for the fused CPU kernel", R, store, padded)
        R = padded
    cluster = torch.zeros(N + 1, dtype=torch.long)
    for i, n in enumerate(names):
        cluster[i] = manifest.adapters[n].cluster
    bank = Bank(store, manifest, names, rows, R, cluster.to(device))
    wanted = set(modules) if modules is not None else None
    by_block: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for i, n in enumerate(names):
        a = manifest.adapters[n]
        by_block.setdefault((a.cluster, a.block), []).append((a.row, i))
    mods = [m for m in manifest.modules if wanted is None or m.name in wanted]
    bad: dict[str, str] = {}  # adapters whose values cannot be served: their Σ rows stay zero
    U, V = _read_bases(manifest, reader, mods, R, dtype, bad)
    for m in mods:
        bank.U[m.name], bank.V[m.name] = U.pop(m.name).to(device), V.pop(m.name).to(device)
        bank.sigma[m.name] = _read_sigma(reader, m.name, by_block, names, N, R, bank.diag, dtype, bad).to(device)
    if wanted is not None and (missing := wanted - set(bank.U)):
        raise StoreError(f"{store}: no module {sorted(missing)[0]} in the store")
    for name, why in bad.items():  # served as nothing rather than as NaN for whoever shares a batch
        i = rows.pop(name)
        for sig in bank.sigma.values():
            sig[i] = 0
        bank.cluster[i] = 0
        manifest.set_aside(name, why)
    if manifest.broken:
        logger.warning("%d adapters of %s are not served (see `vllm-jd fsck`): %s", len(manifest.broken), store,
                       "; ".join(f"{n}: {w}" for n, w in sorted(manifest.broken.items())[:5]))
    logger.info("loaded store %s: %d adapters, %d clusters, rank %d, %d modules", store, N, C, R, len(bank.U))
    return bank


def _read_bases(manifest, reader: TensorReader, mods: list, R: int, dtype: torch.dtype,
                bad: dict[str, str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Every cluster's U [C, d_out, R] and V [C, d_in, R] per module (zero-padded to R); a cluster
    whose basis has bad values stays zero and its adapters go into ``bad`` (name → why)."""
    C = len(manifest.clusters)
    U = {m.name: torch.zeros(C, m.d_out, R, dtype=dtype) for m in mods}
    V = {m.name: torch.zeros(C, m.d_in, R, dtype=dtype) for m in mods}
    # clusters outer, modules inner: a ComPEFT-coded cluster is one payload for all its modules,
    # which the reader then decodes once instead of once per module
    for c in manifest.clusters:
        for m in mods:
            if reader.has(u_key(c.id, m.name)):
                u, v = reader.get(u_key(c.id, m.name)), reader.get(v_key(c.id, m.name))
                if (why := bad_value(u) or bad_value(v)) is not None:
                    bad.update({n: f"basis of cluster {c.id} for {m.name} {why}" for n, a in manifest.adapters.items()
                                if a.cluster == c.id})
                    continue
                U[m.name][c.id, :, : u.shape[1]] = u
                V[m.name][c.id, :, : v.shape[1]] = v
    return U, V


def _read_sigma(reader: TensorReader, module: str, by_block: dict, names: list[str], N: int, R: int, diag: bool,
                dtype: torch.dtype, bad: dict[str, str]) -> torch.Tensor:
    """Module ``module``'s Σ of every adapter: [N+1, R(, R)], row i = adapter names[i] (zero-padded;
    row N, "no adapter", zero); rows with bad values go into ``bad``. by_block: (cluster, block) →
    [(row in the block, adapter index)]."""
    sig = torch.zeros((N + 1, R) if diag else (N + 1, R, R), dtype=dtype)
    for (c, block), members in by_block.items():
        key = sigma_key(c, block, module)
        if not reader.has(key):
            continue
        s = reader.get(key)
        poisoned = set(bad_rows(s).tolist())
        bad.update({names[i]: f"Σ row {r} of {key} has NaN, Inf or huge entries" for r, i in members
                    if r in poisoned})
        src = torch.tensor([r for r, _ in members])
        dst = torch.tensor([i for _, i in members])
        if diag:
            sig[dst, : s.shape[1]] = s[src].to(dtype)
        else:
            sig[dst, : s.shape[1], : s.shape[2]] = s[src].to(dtype)
    return sig
