"""``compress --from-store``: the adapters of an existing store as input to a new compression.

The paper re-clusters everything, added adapters included, every few hours. The best input is
each adapter's original PEFT folder, which the manifest records (``source``, ``checksum``): it
is used when it still exists unchanged (a Hub or URL source is fetched again first: a Hub
source is recorded pinned to its commit, so the bytes are the same unless it was deleted).
Otherwise the adapter is rebuilt from the store itself,
``lora_A = V_cᵀ`` [r_c, d_in], ``lora_B = U_c Σ_i`` [d_out, r_c] (scale 1): exact for exact
singletons, and for shared clusters the stored approximation, whose error then adds to the new
one's; each such adapter is named in a warning.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from vllm_jd.compress.peft_io import ModuleSpec, PeftAdapter, check_update, open_adapter
from vllm_jd.sources.fetch import fetch_all
from vllm_jd.sources.spec import parse_source
from vllm_jd.store.errors import AdapterError, StoreError
from vllm_jd.store.format import Manifest, TensorReader, read_manifest, u_key, v_key

logger = logging.getLogger(__name__)


class StoredAdapter:
    """PeftAdapter's interface over one adapter of a store (its reconstruction U_c Σ_i V_cᵀ)."""

    def __init__(self, reader: TensorReader, name: str):
        m: Manifest = reader.manifest
        self.reader, self.name = reader, name
        self.info = m.adapters[name]
        self.path = Path(self.info.source)
        self.source = self.info.source  # recorded as the new store's source too, as it was
        rank = m.clusters[self.info.cluster].rank
        self.modules = {mod.name: ModuleSpec(u_key(self.info.cluster, mod.name), v_key(self.info.cluster, mod.name),
                                             rank, mod.d_in, mod.d_out, 1.0)
                        for mod, err in zip(m.modules, self.info.module_errors, strict=True) if err is not None}
        self.lora_params = self.info.lora_params  # the source adapter's, so Para. Saved stays comparable
        self.base_model = m.base_model

    def raw_factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(lora_A = V_cᵀ [r, d_in], lora_B = U_c Σ_i [d_out, r]) float32; AdapterError if they are
        not finite or too large to serve (as for a PEFT adapter)."""
        c = self.info.cluster
        U, V = self.reader.get(u_key(c, module)), self.reader.get(v_key(c, module))
        s = self.reader.sigma(self.name, module)
        B = U @ s if s.dim() == 2 else U * s
        if not (torch.isfinite(V).all() and torch.isfinite(B).all()):
            raise AdapterError(self.name, f"its stored update for {module} has NaN or Inf values", self.path)
        check_update(self.name, module, V.T, B.T, self.path)
        return V.T.contiguous(), B.contiguous()

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [r, d_in], Bt [r, d_out]) with P = Btᵀ A, as ``PeftAdapter.factors``."""
        a, b = self.raw_factors(module)
        return a, b.T.contiguous()

    def checksum(self) -> str:
        return self.info.checksum  # the identity of the source adapter, carried over


def store_adapters(store: str | Path, manifest: Manifest | None = None,
                   progress: bool = False) -> list[PeftAdapter | StoredAdapter]:
    """Every adapter of ``store`` (``manifest``: its manifest as already read): its unchanged
    source folder if it still exists, else rebuilt. progress: a bar over remote sources fetched."""
    store = Path(store)
    manifest = read_manifest(store) if manifest is None else manifest
    reader = TensorReader(store, manifest)
    folders = fetched_sources(manifest, list(manifest.adapters), progress)
    out: list[PeftAdapter | StoredAdapter] = []
    rebuilt = []
    for name in manifest.adapters:
        out.append(_best_source(reader, name, folders.get(name)))
        if isinstance(out[-1], StoredAdapter):
            rebuilt.append(name)
    if rebuilt:
        logger.warning("%d of %d adapters are rebuilt from %s (source missing or changed; their stored error "
                       "adds to the new one): %s%s", len(rebuilt), len(out), store, ", ".join(rebuilt[:5]),
                       " …" if len(rebuilt) > 5 else "")
    if manifest.broken:
        logger.warning("%d adapters of %s are set aside (broken entries, see `vllm-jd fsck`) and not recompressed: "
                       "%s", len(manifest.broken), store, ", ".join(sorted(manifest.broken)[:5]))
    return out


def fetched_sources(manifest: Manifest, names: list[str], progress: bool = False) -> dict[str, Path]:
    """Local folders of the adapters ``names`` whose recorded source is a Hub id or a URL, fetched
    (in parallel, from the cache where it has them); one that cannot be fetched is left out (the
    store's copy serves instead) with a warning."""
    remote = []
    for n in names:
        try:
            s = parse_source(manifest.adapters[n].source, exists=lambda _: False)
        except ValueError:
            continue  # a local path that no longer exists
        if s.kind != "local":
            remote.append((n, s))
    got = fetch_all([s for _, s in remote], progress=progress, tolerate=True)
    out = {n: f[0].folder for (n, _), f in zip(remote, got, strict=True) if len(f) == 1}
    if missed := [n for n, _ in remote if n not in out]:
        logger.warning("%d sources could not be fetched again (their stored copies serve): %s", len(missed),
                       ", ".join(missed[:5]))
    return out


def _best_source(reader: TensorReader, name: str, fetched: Path | None = None) -> PeftAdapter | StoredAdapter:
    """Adapter ``name``'s source folder (``fetched``: where its remote source was fetched to) if
    it is unchanged (checksum), else its stored copy."""
    info = reader.manifest.adapters[name]
    src = fetched or Path(info.source)
    if src.is_dir():
        try:
            a = open_adapter(name, src)
            a.source = info.source
            if a.checksum() == info.checksum:
                return a
        except ValueError:
            pass  # unreadable now: fall back to the store's copy
    return StoredAdapter(reader, name)


def _identity(info) -> tuple:
    return info.cluster, info.block, info.row, info.checksum


def _raw_identity(entry: object) -> tuple | None:
    """``_identity`` of a manifest entry as found on disk (None if it has none)."""
    if not isinstance(entry, dict):
        return None
    return tuple(entry.get(k) for k in ("cluster", "block", "row", "checksum"))


def carry_over(store: Path, snapshot: Manifest, max_error: float):
    """``transaction.publish``'s merge for ``compress --from-store S --out S``.

    The new version was built from ``snapshot``; under the lock, S's current manifest may hold
    adapters added (or registered again) since and lack some removed since. Removed ones are
    dropped from the new version; added ones are projected onto its bases as ``add`` would (exact
    above ``max_error``), read from S, whose shards are still in place. Entries S sets aside (or
    that fail their check) are quarantined in the new version; quarantined ones stay quarantined."""
    from vllm_jd.compress.project import place

    def merge(current: Manifest, new: Manifest, staging) -> Manifest:
        if current.generation != snapshot.generation:
            # compacted or recompressed meanwhile: entries are numbered anew, so what changed cannot be told
            raise StoreError(f"{store} became another version while this compression ran (version "
                             f"{snapshot.generation[:8] or '-'} → {current.generation[:8]}: `compact` or another "
                             "`compress --from-store`); nothing was written: run it again")
        before = {n: _identity(a) for n, a in snapshot.adapters.items()}
        # set aside in the snapshot: unchanged only if its entry still says the same (removed and
        # added again meanwhile, it is a new adapter to carry over)
        before.update({n: _raw_identity(entry) for n, (entry, _) in snapshot._broken.items()})
        gone = [n for n in before if n not in current.adapters]
        changed = [n for n, a in current.adapters.items() if before.get(n) != _identity(a)]
        for n in gone + changed:
            new.adapters.pop(n, None)
        if changed:
            reader = TensorReader(store, current)
            folders = fetched_sources(current, changed)
            adapters = [_best_source(reader, n, folders.get(n)) for n in changed]
            # stored exactly meanwhile (`verify --repair`, or `add` above max_error) stays exact, as
            # the exact singletons of the snapshot do: a repaired adapter is not fitted again
            exact = {n for n in changed if current.clusters[current.adapters[n].cluster].kind == "exact"}
            for force in (False, True):
                group = [a for a in adapters if (a.name in exact) == force]
                if group:
                    place(TensorReader(staging.dir, new), new, group, staging.dir, max_error, force_exact=force)
        for n, (entry, why) in [*current._broken.items(), *snapshot._broken.items()]:
            # unservable, but never dropped; quarantined, because their cluster and row numbers would
            # point into the new version's tensors, where they mean another adapter's Σ
            if n not in new.adapters and n not in new.quarantined:
                new.quarantined[n] = {"entry": entry, "reason": f"{why} (set aside when {store} was recompressed)"}
        new.quarantined = {**current.quarantined, **new.quarantined}
        if gone or changed:
            logger.info("carried over what changed in %s while compressing: %d adapters added, %d removed", store,
                        len(changed), len(gone))
        return new

    return merge
