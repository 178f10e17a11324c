"""``add``: put new adapters into an existing store without touching its bases.

Each new adapter is projected onto every shared cluster (JD-Full: ``Σ = U_cᵀ P V_c``; JD-Diag:
the closed-form diagonal) and goes to the one with the lowest aggregate error over all modules.
If that error is above ``max_error`` it is stored exactly as a singleton cluster at its own rank
(QR of B and Aᵀ), or ComPEFT-coded with ``compeft=`` (``compeft_store``), so quality is never
silently lost. For an ``svd`` store a new adapter gets its
own truncated SVD, or an exact singleton above ``max_error``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from vllm_jd.compress import solvers
from vllm_jd.compress.compeft_store import Singleton, encode_singleton, sigma_of
from vllm_jd.compress.factors import ModuleFactors, load_module, reconstruction_losses
from vllm_jd.compress.inputs import gather
from vllm_jd.compress.peft_io import PeftAdapter, open_adapter, recorded_source
from vllm_jd.compress.svd import exact_diag, exact_full
from vllm_jd.config import PLACE_MAX_ERROR
from vllm_jd.sources.fetch import DEFAULT_WORKERS
from vllm_jd.store.dtypes import encode, roundtrip
from vllm_jd.store.errors import AdapterError, StoreError
from vllm_jd.store.format import (
    AdapterInfo,
    ClusterInfo,
    Manifest,
    TensorReader,
    compeft_key,
    read_manifest,
    sigma_key,
    u_key,
    v_key,
)
from vllm_jd.store.names import name_problem
from vllm_jd.store.transaction import STAGING_PREFIX, TENSORS, commit, locked, staging_folder
from vllm_jd.store.validate import bad_value

logger = logging.getLogger(__name__)


@dataclass
class Added:
    name: str
    cluster: int
    kind: str
    error: float
    new: bool = True
    """False: the store already held this very adapter (same checksum); nothing was written."""
    block: int = 0
    row: int = 0
    """Where its Σ is: row ``row`` of Σ block ``block`` of its cluster."""


def _check_modules(manifest: Manifest, adapter: PeftAdapter) -> None:
    dims = {m.name: (m.d_in, m.d_out) for m in manifest.modules}
    for m, s in adapter.modules.items():
        if m not in dims:
            raise AdapterError(adapter.name, f"module '{m}' is not in the store (its modules: "
                                             f"{', '.join(sorted(dims)[:4])}, …)", adapter.path)
        if dims[m] != (s.d_in, s.d_out):
            raise AdapterError(adapter.name, f"module '{m}' maps {s.d_in}→{s.d_out} but the store has "
                                             f"{dims[m][0]}→{dims[m][1]}", adapter.path)


def add(store: str | Path, paths: list[str | Path], max_error: float = PLACE_MAX_ERROR,
        compeft: tuple[float, float, str] | None = None, fetch_workers: int = DEFAULT_WORKERS,
        progress: bool = False) -> list[Added]:
    """Add the PEFT adapters of ``paths`` (folders, Hub ids or URLs: ``inputs.gather``) to
    ``store``; returns where each one went.

    compeft: (density, alpha, encoding) to store singletons ComPEFT-coded instead of exactly.
    """
    if not max_error > 0:  # the cheap checks before any download
        raise ValueError(f"`max_error` must be > 0, got {max_error}")
    read_manifest(Path(store))
    inputs = gather(paths, fetch_workers, progress)
    return add_named(store, [(i.name, i.folder) for i in inputs], max_error, compeft,
                     sources=[i.source for i in inputs])


def add_named(store: str | Path, named: list[tuple[str, Path]], max_error: float = PLACE_MAX_ERROR,
              compeft: tuple[float, float, str] | None = None, lock_timeout: float | None = None,
              still_wanted: Callable[[], bool] | None = None, sources: list[str | None] | None = None,
              generation: str | None = None) -> list[Added]:
    """``add`` with explicit (name, adapter folder) pairs (a server registers under the request's name).

    lock_timeout: seconds to wait for the store's lock (None: as long as it takes). still_wanted:
    asked under the lock just before the commit; False (the caller gave up waiting) cancels it.
    sources: what to record as each adapter's source (default: its folder, absolute).
    generation: refuse unless the store is still this version (a server adds only to the version
    its workers hold).
    """
    store = Path(store)
    if not max_error > 0:
        raise ValueError(f"`max_error` must be > 0, got {max_error}")
    for name, p in named:
        if (why := name_problem(name)) is not None:
            raise AdapterError(str(name)[:80], why, p)
    adapters = [open_adapter(name, Path(p)) for name, p in named]
    for a, src in zip(adapters, sources or [None] * len(adapters), strict=True):
        a.source = src
    with locked(store, timeout=lock_timeout):
        manifest = read_manifest(store)
        if generation is not None and manifest.generation != generation:
            raise StoreError(f"{store} was recompressed since the server loaded it (version {generation[:8] or '-'} "
                             f"→ {manifest.generation[:8]}): switch to it (POST /v1/jd/store) or restart, then "
                             "register again; nothing was changed")
        for a in adapters:
            if a.name in manifest.adapters or a.name in manifest.broken or a.name in manifest.quarantined:
                raise AdapterError(a.name, "an adapter of this name is already in the store", a.path)
            _check_modules(manifest, a)
        with staging_folder(store / f"{STAGING_PREFIX}{uuid.uuid4().hex[:8]}") as staged:
            placed = place(TensorReader(store, manifest), manifest, adapters, staged, max_error, compeft)
            if still_wanted is not None and not still_wanted():
                raise StoreError("the registration was cancelled (it waited too long); the store is unchanged")
            commit(store, staged, manifest)
    return placed


def _projection_errors(reader: TensorReader, manifest: Manifest, adapters: list, shared: list[int]) -> torch.Tensor:
    """[n adapters, len(shared)]: each new adapter's relative error projected onto each shared
    cluster (inf for a cluster whose bases cannot be read: never chosen; fsck names it)."""
    n = len(adapters)
    cost = torch.zeros(n, len(shared), dtype=torch.float64)
    total = torch.zeros(n, dtype=torch.float64)
    unusable: set[int] = set()  # clusters whose bases cannot be read: never chosen (fsck names them)
    for m in manifest.modules:  # pass 1: the error of every new adapter under every shared cluster
        if not shared or not any(m.name in a.modules for a in adapters):
            continue
        f, present = load_module(adapters, m.name)
        total[present] += f.norms() ** 2
        for j, c in enumerate(shared):
            if u_key(c, m.name) not in manifest.weight_map:
                cost[present, j] += f.norms() ** 2
                continue
            try:
                U, V = reader.get(u_key(c, m.name)), reader.get(v_key(c, m.name))
                if (why := bad_value(U) or bad_value(V)) is not None:
                    raise StoreError(f"basis of cluster {c} for {m.name} {why}")
            except StoreError as e:
                if j not in unusable:
                    logger.warning("cluster %d is not a candidate for new adapters: %s", c, e)
                unusable.add(j)
                continue
            cost[present, j] += solvers.projection_losses(manifest.method, f, U, V)
    cost[:, sorted(unusable)] = float("inf")
    return (cost / total.clamp_min(1e-300)[:, None]).sqrt()


def place(reader: TensorReader, manifest: Manifest, adapters: list, staged: Path, max_error: float,
          compeft: tuple[float, float, str] | None = None, force_exact: bool = False) -> list[Added]:
    """Put ``adapters`` into ``manifest`` (in memory): project each onto its best shared cluster
    (``reader`` reads the bases), or make it a singleton above ``max_error`` (always with
    ``force_exact``). Their tensors go into one new shard under ``staged/tensors``; the caller
    commits."""
    shared = [] if force_exact else [c.id for c in manifest.clusters if c.kind == "shared"]
    rel = _projection_errors(reader, manifest, adapters, shared)
    best = rel.argmin(1) if shared else torch.zeros(len(adapters), dtype=torch.long)
    block = manifest.next_block
    placed: list[Added] = []
    new_clusters: list[ClusterInfo] = []
    singletons: dict[int, Singleton] = {}  # ComPEFT-coded new singletons, by adapter index
    for i, a in enumerate(adapters):
        err = float(rel[i, best[i]]) if shared else float("inf")
        if manifest.method == "svd":
            kind = "svd" if err <= max_error else "exact"
        else:
            kind = "shared" if err <= max_error else "exact"
        if kind == "shared":
            placed.append(Added(a.name, shared[int(best[i])], kind, err))
        else:
            cid = len(manifest.clusters) + len(new_clusters)
            rank = max(s.rank for s in a.modules.values()) if kind == "exact" else manifest.rank
            info = None
            if kind == "exact" and compeft is not None:
                kind, singletons[i] = "compeft", encode_singleton(a, *compeft)
                info = singletons[i].info
            new_clusters.append(ClusterInfo(id=cid, rank=rank, kind=kind, compeft=info))
            placed.append(Added(a.name, cid, kind, 0.0 if kind == "exact" else err))
    tensors, rows, errors = _tensors(reader, manifest, adapters, placed, new_clusters, block, singletons)
    shard = f"{TENSORS}/add-{block:05d}-{uuid.uuid4().hex[:6]}.safetensors"
    save_file(tensors, str(staged / shard))
    manifest.clusters.extend(new_clusters)
    manifest.weight_map.update({k: shard for k in tensors})
    for i, (a, p) in enumerate(zip(adapters, placed, strict=True)):
        manifest.adapters[a.name] = AdapterInfo(
            cluster=p.cluster, block=block, row=rows[i], rank=max(s.rank for s in a.modules.values()),
            lora_params=a.lora_params, checksum=a.checksum(), source=recorded_source(a), error=errors[i][0],
            module_errors=errors[i][1], error_fp32=errors[i][2])
        p.error, p.block, p.row = errors[i][0], block, rows[i]
    manifest.next_block = block + 1
    return placed


def _tensors(reader: TensorReader, manifest: Manifest, adapters: list[PeftAdapter], placed: list[Added],
             new_clusters: list[ClusterInfo], block: int, singletons: dict[int, Singleton] | None = None):
    """Pass 2: Σ rows (and singleton bases) of the new adapters, with their errors."""
    singletons = singletons or {}
    ranks = {c.id: c.rank for c in manifest.clusters + new_clusters}
    by_cluster: dict[int, list[int]] = {}
    for i, p in enumerate(placed):
        by_cluster.setdefault(p.cluster, []).append(i)
    rows = [by_cluster[p.cluster].index(i) for i, p in enumerate(placed)]
    quantised = (manifest.basis_dtype, manifest.sigma_dtype) != ("fp32", "fp32")
    sq = [[None] * len(manifest.modules) for _ in adapters]
    sq32 = [[None] * len(manifest.modules) for _ in adapters]  # before quantisation
    weight = [[0.0] * len(manifest.modules) for _ in adapters]
    tensors: dict[str, torch.Tensor] = {compeft_key(placed[i].cluster): s.payload for i, s in singletons.items()}
    for mi, m in enumerate(manifest.modules):
        if not any(m.name in a.modules for a in adapters):
            continue
        f, present = load_module(adapters, m.name)
        norms = f.norms()
        local = {int(i): j for j, i in enumerate(present)}
        for c, members in by_cluster.items():
            sig, losses, losses_q = _fit_cluster_module(reader, manifest, f, local, placed, members, c, ranks[c],
                                                        m.name, singletons, tensors)
            tensors.update(encode(sigma_key(c, block, m.name), sig, manifest.sigma_dtype, "sigma"))
            for i, loss in losses.items():
                nrm = float(norms[local[i]])
                sq32[i][mi] = loss / nrm**2 if nrm > 0 else 0.0
            for i, loss in losses_q.items():
                nrm = float(norms[local[i]])
                sq[i][mi] = loss / nrm**2 if nrm > 0 else 0.0
                weight[i][mi] = nrm**2
    errors = []
    for i in range(len(adapters)):
        w = sum(weight[i])
        agg, agg32 = ((sum((e or 0.0) * wt for e, wt in zip(x[i], weight[i], strict=True)) / w) ** 0.5 if w > 0 else 0.0
                      for x in (sq, sq32))
        errors.append((agg, [None if e is None else round(e**0.5, 6) for e in sq[i]], agg32 if quantised else None))
    return tensors, rows, errors


def _fit_cluster_module(reader: TensorReader, manifest: Manifest, f: ModuleFactors, local: dict[int, int],
                        placed: list[Added], members: list[int], c: int, r: int, module: str,
                        singletons: dict[int, Singleton], tensors: dict[str, torch.Tensor]):
    """One module of cluster ``c``'s new members (indices into ``placed``; ``local`` maps them to
    rows of ``f``): their Σ [k, r(, r)], new or singleton bases written into ``tensors``, and each
    member's squared error as computed and as a reader gets it back after the store's dtypes:
    (Σ, {i: loss}, {i: loss read back})."""
    full = manifest.sigma == "full"
    sig = torch.zeros((len(members), r, r) if full else (len(members), r), dtype=torch.float32)
    basis = None  # an existing cluster's (U, V), read once for all its new members
    if placed[members[0]].kind == "shared":
        basis = reader.get(u_key(c, module)), reader.get(v_key(c, module))
    losses = {}
    for row, i in enumerate(members):
        if i not in local:
            continue
        j = local[i]
        one = ModuleFactors(f.A[j : j + 1], f.Bt[j : j + 1])
        if i in singletons:  # bases are in the cluster's ComPEFT payload; Σ = s·I
            U, V, scale = singletons[i].bases[module]
            s = sigma_of(scale, U.shape[1], r, full)
            basis = _pad(U, r), _pad(V, r)
            losses[i] = float(reconstruction_losses(one, *basis, s[None])[0])
        else:
            U, V, s, losses[i] = _fit_one(manifest, one, r, placed[i].kind, basis)
            if U is not None:
                basis = U, V
                tensors.update(encode(u_key(c, module), U, manifest.basis_dtype, "basis"))
                tensors.update(encode(v_key(c, module), V, manifest.basis_dtype, "basis"))
        if full:
            sig[row, : s.shape[0], : s.shape[1]] = s
        else:
            sig[row, : s.shape[0]] = s
    read_back = dict(losses)
    if (manifest.basis_dtype, manifest.sigma_dtype) != ("fp32", "fp32") and losses:  # as compress measures
        Uq, Vq = (roundtrip(x, manifest.basis_dtype, "basis") if placed[members[0]].kind != "compeft" else x
                  for x in basis)
        sq_sig = roundtrip(sig, manifest.sigma_dtype, "sigma")
        for row, i in enumerate(members):
            if i in losses:
                j = local[i]
                one = ModuleFactors(f.A[j : j + 1], f.Bt[j : j + 1])
                read_back[i] = float(reconstruction_losses(one, Uq, Vq, sq_sig[row : row + 1])[0])
    return sig, losses, read_back


def _fit_one(manifest: Manifest, one: ModuleFactors, rank: int, kind: str,
             basis: tuple[torch.Tensor, torch.Tensor] | None):
    """(U, V) for a new singleton (else None), Σ of the adapter, and its squared loss.

    basis: the (U, V) of the existing cluster a "shared" adapter is projected onto.
    """
    if kind == "shared":
        U, V = basis
        s = solvers.project(manifest.method, one, U, V)[0]
        loss = float(solvers.final_losses(manifest.method, one, U, V, s[None])[0])
        return None, None, s, loss
    if kind == "exact" and manifest.sigma == "full":
        U, s, V = exact_full(one)  # zero-padded ranks sit in the trailing rows/columns of Σ
        return _pad(U[0], rank), _pad(V[0], rank), s[0, :rank, :rank], 0.0
    U, s, V = exact_diag(one)
    keep = min(rank, s.shape[1])
    loss = float((s[0, keep:].double() ** 2).sum())
    return _pad(U[0, :, :keep], rank), _pad(V[0, :, :keep], rank), s[0, :keep], loss


def _pad(x: torch.Tensor, rank: int) -> torch.Tensor:
    x = x[:, :rank]
    return torch.nn.functional.pad(x, (0, rank - x.shape[1])).contiguous()
