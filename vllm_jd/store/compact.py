"""``vllm-jd compact STORE``: drop what no adapter reads any more, without changing any adapter.

Shards are immutable (``transaction``), so after ``remove``, or ``verify --repair`` (which stores
an adapter again as an exact singleton), the old cluster's bases and Σ rows stay in the store:
``inspect`` counts them and a server loads them. Compaction writes a new version holding only
what the adapters read:

- clusters no adapter uses are dropped; the rest are renumbered 0..C'-1 in their old order;
- each kept cluster's Σ rows, from whatever blocks ``add`` wrote them to, are gathered into one
  block 0 (rows in the order of the adapters' names); rows nobody reads are dropped.

Every tensor is copied as stored (int8 values with their scales, ComPEFT payloads), so each
adapter's U_c, Σ_i and V_c, which is what is served, stays bit-for-bit the same.

Compaction is a new store version (a new ``generation``, as an in-place recompression): a running
server keeps serving what it loaded and asks to be switched (``POST /v1/jd/store``) at its next
refresh. Quarantined or broken entries point at tensors by the old numbering, so compaction
refuses while there are any: nothing they point to is lost.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from vllm_jd.store.dtypes import SCALE_SUFFIX
from vllm_jd.store.errors import StoreError
from vllm_jd.store.format import (
    ClusterInfo,
    Manifest,
    TensorReader,
    compeft_key,
    read_manifest,
    shard_path,
    sigma_key,
    u_key,
    v_key,
)
from vllm_jd.store.transaction import Staging, publish, writing

_KNOWN_KEY = re.compile(r"^(U|V)\.\d+\.[^.].*$|^sigma\.\d+\.\d+\.[^.].*$|^compeft\.\d+$")


def compact(store: str | Path, progress: bool = True) -> dict:
    """Compact ``store`` in place (one atomic commit under its lock) and report what it dropped:
    {"clusters": [before, after], "sigma_rows": [before, after], "bytes": [before, after],
    "changed": bool}. Nothing to drop: the store is left as it is (same version)."""
    store = Path(store)
    plan = read_manifest(store)
    _refuse_unsafe(store, plan)
    rows = _rows(store, plan)
    if not _has_garbage(plan, rows):
        size = _bytes(store, plan)
        return {"clusters": [len(plan.clusters)] * 2, "sigma_rows": [rows] * 2, "bytes": [size] * 2, "changed": False}
    report: dict = {}
    with writing(store) as staging:
        publish(staging, plan, lambda current, _, staging: _compacted(store, current, staging, report, progress))
    report["bytes"].append(_bytes(store, read_manifest(store)))
    report["changed"] = True
    return report


def _refuse_unsafe(store: Path, m: Manifest) -> None:
    """StoreError where compaction could lose something: entries that point by the old numbering,
    or tensors of a kind this version does not know (a newer vllm-jd's)."""
    aside = sorted(m.quarantined) + sorted(m.broken)
    if aside:
        raise StoreError(f"{store}: {len(aside)} quarantined or broken adapter entries ({', '.join(aside[:5])}) "
                         "point at tensors that compaction would renumber or drop; `vllm-jd remove` them "
                         "(re-add them from their sources) before compacting")
    unknown = sorted(k for k in m.weight_map if not _KNOWN_KEY.match(k.removesuffix(SCALE_SUFFIX)))
    if unknown:
        raise StoreError(f"{store}: tensor {unknown[0]} is of a kind this vllm-jd does not know; not compacting")


def _has_garbage(m: Manifest, rows: int) -> bool:
    """Whether some cluster is unused, or the ``rows`` Σ rows stored hold some no adapter reads."""
    used = {a.cluster for a in m.adapters.values()}
    return used != set(range(len(m.clusters))) or rows > _rows_needed(m)


def _members(m: Manifest) -> dict[int, list[str]]:
    """Each used cluster's adapters, by name (one pass: stores hold thousands of singletons)."""
    out: dict[int, list[str]] = {}
    for name in sorted(m.adapters):
        out.setdefault(m.adapters[name].cluster, []).append(name)
    return out


def _rows_needed(m: Manifest) -> int:
    """Σ rows a compacted ``m`` holds: per cluster and module, one per member if any member has it."""
    total = 0
    for names in _members(m).values():
        has = [any(m.adapters[n].module_errors[mi] is not None for n in names) for mi in range(len(m.modules))]
        total += len(names) * sum(has)
    return total


def _rows(store: Path, m: Manifest) -> int:
    """Σ rows stored, over every Σ tensor (a row per adapter slot per module)."""
    total = 0
    by_shard: dict[str, list[str]] = {}
    for k, shard in m.weight_map.items():
        if k.startswith("sigma.") and not k.endswith(SCALE_SUFFIX):
            by_shard.setdefault(shard, []).append(k)
    for shard, keys in by_shard.items():
        with safe_open(str(shard_path(store, shard)), framework="pt") as f:
            total += sum(f.get_slice(k).get_shape()[0] for k in keys)
    return total


def _bytes(store: Path, m: Manifest) -> int:
    return sum(shard_path(store, s).stat().st_size for s in set(m.weight_map.values()))


def _compacted(store: Path, cur: Manifest, staging: Staging, report: dict, progress: bool) -> Manifest:
    """The compacted manifest of ``cur`` (the store's manifest under the lock), its shards written
    into ``staging``: one per module, one for ComPEFT payloads."""
    _refuse_unsafe(store, cur)  # again: what we change is what is there now
    report["clusters"] = [len(cur.clusters)]
    report["sigma_rows"] = [_rows(store, cur)]
    report["bytes"] = [_bytes(store, cur)]  # the after figure is taken once the old shards are gone
    members = _members(cur)
    kept = sorted(members)
    new_id = {c: i for i, c in enumerate(kept)}
    new = cur.model_copy(deep=True)
    new.clusters = [ClusterInfo(**{**cur.clusters[c].model_dump(), "id": new_id[c]}) for c in kept]
    for c in kept:
        for row, name in enumerate(members[c]):
            a = new.adapters[name]
            a.cluster, a.block, a.row = new_id[c], 0, row
    new.next_block, new.generation, new.weight_map = 1, staging.generation, {}
    reader, rows = TensorReader(store, cur), 0
    for mi, module in enumerate(tqdm(cur.modules, desc="compact", unit="module", disable=not progress)):
        tensors = _module_tensors(reader, cur, mi, module.name, kept, new_id, members)
        rows += sum(t.shape[0] for k, t in tensors.items() if k.startswith("sigma.") and not k.endswith(SCALE_SUFFIX))
        _save(staging, f"compact-m{mi:05d}", tensors, new)
    payloads = {}
    for c in kept:
        if compeft_key(c) in cur.weight_map:
            payloads[compeft_key(new_id[c])] = reader.stored(compeft_key(c))
    _save(staging, "compact-compeft", payloads, new)
    report["clusters"].append(len(new.clusters))
    report["sigma_rows"].append(rows)
    return new


def _module_tensors(reader: TensorReader, cur: Manifest, mi: int, module: str, kept: list[int],
                    new_id: dict[int, int], members: dict[int, list[str]]) -> dict[str, torch.Tensor]:
    """Module ``module``'s kept bases under their new keys, and each kept cluster's Σ rows gathered
    into block 0 (zero rows for adapters without the module, as ``compress`` writes them)."""
    out: dict[str, torch.Tensor] = {}
    blocks: dict[str, torch.Tensor] = {}  # each old Σ tensor read once

    def raw(key: str) -> torch.Tensor:
        if key not in blocks:
            blocks[key] = reader.stored(key)
        return blocks[key]

    for c in kept:
        for old, new in ((u_key(c, module), u_key(new_id[c], module)), (v_key(c, module), v_key(new_id[c], module))):
            for suffix in ("", SCALE_SUFFIX):
                if old + suffix in cur.weight_map:
                    out[new + suffix] = reader.stored(old + suffix)
        having = [cur.adapters[n] for n in members[c] if cur.adapters[n].module_errors[mi] is not None]
        if not having:
            continue
        for suffix in ("", SCALE_SUFFIX):
            keys = {sigma_key(a.cluster, a.block, module) + suffix for a in having}
            if not all(k in cur.weight_map for k in keys):
                continue  # no scales: not int8
            like = raw(next(iter(keys)))[0]
            rows = []
            for n in members[c]:
                a = cur.adapters[n]
                if a.module_errors[mi] is None:
                    rows.append(torch.zeros_like(like))
                    continue
                block = raw(sigma_key(a.cluster, a.block, module) + suffix)
                if a.row >= block.shape[0]:  # a hand-edited manifest: refuse, as fsck would flag it
                    raise StoreError(f"adapter {n!r}: row {a.row} is past the {block.shape[0]} rows of "
                                     f"{sigma_key(a.cluster, a.block, module)}; `vllm-jd fsck --repair` first")
                rows.append(block[a.row])
            out[sigma_key(new_id[c], 0, module) + suffix] = torch.stack(rows).contiguous()
    return out


def _save(staging: Staging, stem: str, tensors: dict[str, torch.Tensor], new: Manifest) -> None:
    if not tensors:
        return
    shard = staging.shard(stem)
    save_file(tensors, str(staging.dir / shard))
    new.weight_map.update({k: shard for k in tensors})


def format_report(store: str | Path, r: dict) -> str:
    if not r["changed"]:
        return f"{store}: nothing to compact ({r['clusters'][0]} clusters, {r['sigma_rows'][0]} Σ rows, all read)"
    mib = [b / 2**20 for b in r["bytes"]]
    return (f"compacted {store}: clusters {r['clusters'][0]} → {r['clusters'][1]}, Σ rows {r['sigma_rows'][0]} → "
            f"{r['sigma_rows'][1]}, {mib[0]:.2f} → {mib[1]:.2f} MiB. A new store version: servers that loaded the "
            "old one keep serving it until switched (POST /v1/jd/store under --jd-admin) or restarted")
