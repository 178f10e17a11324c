"""``merge``: T adapters of a store → ONE standard rank-r PEFT LoRA (Compress-then-Merge).

Selection (``--adapters`` or ``--cluster``), reading one module of the selected adapters at a
time, ``ctm.merge_module`` per module, and the atomic PEFT folder + ``merge.json``. The math,
its notation and the PEFT factor convention are in ``ctm``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vllm_jd.compress.ctm import (
    DEFAULT_BETA,
    DEFAULT_DROP,
    DEFAULT_ITERS,
    DEFAULT_TOL,
    DEFAULT_TOPK,
    ModuleMerge,
    Space,
    merge_module,
)
from vllm_jd.compress.factors import ModuleFactors
from vllm_jd.compress.merge_rules import canonical_rule
from vllm_jd.compress.peft_write import refuse_non_empty, write_adapter_atomic
from vllm_jd.store.errors import StoreError
from vllm_jd.store.format import Manifest, TensorReader, read_manifest, u_key, v_key

logger = logging.getLogger(__name__)

MERGE_INFO = "merge.json"
"""Written next to the PEFT files: rule, settings, sources, rank, retention."""

@dataclass
class MergeResult:
    """A store's selected adapters merged into one LoRA: one ``ModuleMerge`` per module."""

    rule: str
    beta: float
    scale: float
    rank: int
    """The target rank r (every module's exported rank is ≤ r)."""
    sources: list[str]
    modules: dict[str, ModuleMerge] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    base_model: str | None = None

    @property
    def mean_retention(self) -> float:
        """Mean over modules and their adapters of the energy retention ρ (zero updates left out)."""
        vals = [x for m in self.modules.values() for x in m.retention if not math.isnan(x)]
        return sum(vals) / len(vals) if vals else float("nan")

    def retention_by_adapter(self) -> dict[str, float]:
        """Each source adapter's mean retention over the modules it has."""
        acc: dict[str, list[float]] = {}
        for m in self.modules.values():
            for name, x in zip(m.adapters, m.retention, strict=True):
                if not math.isnan(x):
                    acc.setdefault(name, []).append(x)
        return {name: sum(v) / len(v) for name, v in acc.items()}

    def summary(self) -> dict:
        """The ``merge.json`` record: rule, settings, sources, rank, retention."""
        spaces = [m.subspace.space for m in self.modules.values()]
        return {
            "method": "compress-then-merge", "rule": self.rule, "beta": self.beta, "scale": self.scale,
            "rank": self.rank, "sources": self.sources, "modules": len(self.modules),
            "modules_in_core_space": spaces.count("core"),
            "modules_lossless": sum(m.subspace.lossless for m in self.modules.values()),
            "mean_retention": None if math.isnan(self.mean_retention) else self.mean_retention, "retention": self.retention_by_adapter(), **self.settings,
        }


def _select(manifest: Manifest, store: Path, names: list[str] | None, cluster: int | None) -> list[str]:
    """The adapter names chosen by exactly one of ``names`` / ``cluster``; ValueError otherwise."""
    if (names is None) == (cluster is None):
        raise ValueError("select the adapters to merge with exactly one of names (--adapters) or cluster (--cluster)")
    if names is not None:
        names = list(names)
        if not names:
            raise ValueError("names is empty: give at least one adapter to merge")
        seen = set()
        for n in names:
            if n in seen:
                raise ValueError(f"adapter {n!r} is listed twice")
            seen.add(n)
            if n not in manifest.adapters:
                known = ", ".join(sorted(manifest.adapters)[:5])
                raise StoreError(f"no adapter named {n!r} in {store} (it has {len(manifest.adapters)}: {known}, …)")
        return names
    ids = [c.id for c in manifest.clusters]
    if cluster not in ids:
        raise StoreError(f"no cluster {cluster} in {store} (cluster ids are 0…{len(ids) - 1})")
    chosen = sorted(n for n, a in manifest.adapters.items() if a.cluster == cluster)
    if not chosen:
        raise StoreError(f"cluster {cluster} of {store} has no adapters")
    return chosen


def _validate(beta: float, scale: float, topk: float, drop: float, iters: int) -> None:
    if not (isinstance(beta, (int, float)) and 0 <= beta <= 1):
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    if not (0 < topk <= 100):
        raise ValueError(f"topk must be a percentage in (0, 100], got {topk}")
    if not (0 <= drop < 1):
        raise ValueError(f"drop must be in [0, 1), got {drop}")
    if iters < 0:
        raise ValueError(f"iters must be ≥ 0, got {iters}")


def load_module_factors(reader: TensorReader, names: list[str], module: str
                        ) -> tuple[ModuleFactors, list[str], tuple[torch.Tensor, torch.Tensor]] | None:
    """``module`` of the adapters in ``names`` that have it, float64, and its cluster span.

    Returns (factors A [T_m, r_max, d_in] = V_cᵀ, Bt [T_m, r_max, d_out] = (U_c Σ_t)ᵀ, zero-padded to
    the largest cluster rank; the T_m names; (concatenated U_c [d_out, Σ r_c], V_c [d_in, Σ r_c]) of
    the distinct clusters), or None if no selected adapter has the module. Same reconstruction
    as ``export.reconstruct``, one module at a time so memory is one module of T adapters.
    """
    manifest = reader.manifest
    mi = manifest.module_index()[module]
    present = [n for n in names if manifest.adapters[n].module_errors[mi] is not None]
    if not present:
        return None
    bases: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    rows = []
    for n in present:
        c = manifest.adapters[n].cluster
        if c not in bases:
            bases[c] = (reader.get(u_key(c, module)).double(), reader.get(v_key(c, module)).double())
        U, V = bases[c]
        s = reader.sigma(n, module).double()
        B = U @ s if s.dim() == 2 else U * s  # [d_out, r_c]
        rows.append((V.T, B.T))
    r_max = max(a.shape[0] for a, _ in rows)
    info = manifest.modules[mi]
    A = torch.zeros(len(rows), r_max, info.d_in, dtype=torch.float64)
    Bt = torch.zeros(len(rows), r_max, info.d_out, dtype=torch.float64)
    for t, (a, bt) in enumerate(rows):
        A[t, : a.shape[0]], Bt[t, : bt.shape[0]] = a, bt
    span = (torch.cat([u for u, _ in bases.values()], 1), torch.cat([v for _, v in bases.values()], 1))
    return ModuleFactors(A, Bt), present, span


def merge(store: str | Path, names: list[str] | None = None, cluster: int | None = None,
          rule: str = "ties", beta: float = DEFAULT_BETA, scale: float = 1.0, rank: int | None = None,
          topk: float = DEFAULT_TOPK, drop: float = DEFAULT_DROP, seed: int = 0, iters: int = DEFAULT_ITERS,
          tol: float | None = DEFAULT_TOL, space: Space = "auto") -> MergeResult:
    """Merge the adapters ``names`` (or all of cluster ``cluster``) of ``store`` into one LoRA.

    ``rank`` defaults to the store's rank r. ``seed`` seeds DARE's drops and any full-space
    initialisation (one generator, modules in store order). Raises ValueError/StoreError
    naming the bad value.
    """
    store = Path(store)
    rule = canonical_rule(rule)
    _validate(beta, scale, topk, drop, iters)
    manifest = read_manifest(store)
    chosen = _select(manifest, store, names, cluster)
    rank = manifest.rank if rank is None else rank
    mi_of = manifest.module_index()
    used = [m for m in manifest.modules
            if any(manifest.adapters[n].module_errors[mi_of[m.name]] is not None for n in chosen)]
    if not used:
        raise ValueError(f"the selected adapters ({', '.join(chosen)}) have no modules")
    max_rank = min(min(m.d_in, m.d_out) for m in used)
    if not (isinstance(rank, int) and 1 <= rank <= max_rank):
        raise ValueError(f"rank must be an integer in [1, {max_rank}] (the smallest module dimension), got {rank}")

    reader = TensorReader(store, manifest)
    generator = torch.Generator().manual_seed(seed)
    result = MergeResult(rule, float(beta), float(scale), rank, chosen, base_model=manifest.base_model,
                         settings={"topk": topk, "drop": drop, "seed": seed, "iters": iters, "tol": tol,
                                   "space": space, "store": str(store), "cluster": cluster})
    for m in used:
        loaded = load_module_factors(reader, chosen, m.name)
        assert loaded is not None  # `used` only holds modules some chosen adapter has
        f, present, span = loaded
        if not bool((f.norms() > 0).any()):  # e.g. a ComPEFT code that kept nothing of this module
            logger.warning("merge: every selected update of %s is zero; the merged adapter leaves it out", m.name)
            continue
        mm = merge_module(f, rank, rule, beta, scale, topk, drop, generator, space, iters, tol, span, present)
        result.modules[m.name] = mm
        logger.debug("merge %s: %d adapters, %s space %s, rank %d, retention min %.4f", m.name, f.n,
                     mm.subspace.space, mm.subspace.core_dims, mm.rank,
                     min((x for x in mm.retention if not math.isnan(x)), default=math.nan))
    if not result.modules:
        raise ValueError(f"every update of the selected adapters ({', '.join(chosen)}) is zero: nothing to merge")
    logger.info("merged %d adapters × %d modules: rule %s, rank %d, mean retention %.4f", len(chosen),
                len(result.modules), rule, rank, result.mean_retention)
    return result


def merge_to_peft(store: str | Path, out: str | Path, **kwargs) -> MergeResult:
    """``merge(store, **kwargs)`` written as ONE PEFT LoRA folder ``out`` (atomic) plus ``merge.json``.

    ``out`` must not exist or be an empty folder (checked before any work), so nothing of the
    user's is overwritten; on failure nothing is left behind.
    """
    out = Path(out)
    refuse_non_empty(out)  # before any work
    result = merge(store, **kwargs)
    factors = {name: mm.lora() for name, mm in result.modules.items()}
    rank = max(a.shape[0] for a, _ in factors.values())
    write_adapter_atomic(out, factors, rank, result.base_model,
                         {MERGE_INFO: json.dumps(result.summary(), indent=1) + "\n"})
    return result
