"""Checking a store against its manifest: what ``serve``, ``inspect`` and ``fsck`` trust.

A tampered or damaged store once served without complaint: a missing Σ block or an out-of-range
cluster served the base model, a negative row another adapter's Σ, a wrong shape changed every
adapter, an Inf in a basis failed every request. ``check_store`` finds all of these before a
single request is served, and says whom each problem concerns:

- **store problems** make the store unusable as a whole (a module table with duplicates, cluster
  ids out of order): ``serve`` and ``inspect`` refuse it (exit 2);
- **adapter problems** concern the adapters whose tensors they touch (a bad Σ row: that adapter;
  a bad basis or shard: every adapter reading it): those adapters are set aside, the rest served.

Values are checked too (``values=True``): every basis and Σ entry finite and within fp16's range
(``MAX_VALUE``), the narrowest dtype a server may compute in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from vllm_jd.store.dtypes import SCALE_SUFFIX
from vllm_jd.store.errors import StoreError
from vllm_jd.store.format import Manifest, TensorReader, compeft_key, shard_path, sigma_key, u_key, v_key

MAX_VALUE = 65504.0
"""Largest |entry| of a basis or Σ accepted: fp16's largest value (see ``peft_io.MAX_UPDATE_NORM``)."""


@dataclass
class Findings:
    """What ``check_store`` found: problems of the whole store, and adapter → its first problem."""

    store: list[str] = field(default_factory=list)
    adapters: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.store and not self.adapters

    def blame(self, names: list[str], problem: str) -> None:
        for n in names:
            self.adapters.setdefault(n, problem)

    def set_aside(self, manifest: Manifest) -> None:
        """Take every adapter with a problem out of ``manifest.adapters`` (``Manifest.set_aside``)."""
        for name, why in self.adapters.items():
            if name in manifest.adapters:
                manifest.set_aside(name, why)

    def refuse_store(self, store: str | Path) -> None:
        """StoreError naming the store-wide problems, if any (nothing of the store can be served)."""
        if self.store:
            raise StoreError(f"{store} cannot be served: {'; '.join(self.store)} (see `vllm-jd fsck {store}`)")


def bad_rows(sigma: torch.Tensor) -> torch.Tensor:
    """Indices of the rows of a Σ tensor [k, ...] with a non-finite entry or one beyond ``MAX_VALUE``."""
    flat = sigma.reshape(sigma.shape[0], -1).float()
    ok = torch.isfinite(flat).all(1) & (flat.abs() <= MAX_VALUE).all(1)
    return (~ok).nonzero().squeeze(1)


def bad_value(x: torch.Tensor) -> str | None:
    """Why a basis tensor cannot be served (non-finite or too large entries), or None."""
    x = x.float()
    if not bool(torch.isfinite(x).all()):
        return "has NaN or Inf entries"
    if x.numel() and float(x.abs().max()) > MAX_VALUE:
        return f"has entries up to {float(x.abs().max()):.3g}, beyond {MAX_VALUE:g}"
    return None


def _expected(manifest: Manifest) -> dict[str, tuple[tuple[int, ...], str, list[str]]]:
    """Every tensor the adapters need: key → (shape, store dtype name, the adapters that read it).
    A Σ block's first dim is checked separately (it must cover every row used)."""
    dims = {m.name: (m.d_in, m.d_out) for m in manifest.modules}
    want: dict[str, tuple[tuple[int, ...], str, list[str]]] = {}
    for name, a in manifest.adapters.items():
        c = manifest.clusters[a.cluster]
        r = c.rank
        for m, err in zip(manifest.modules, a.module_errors, strict=True):
            if err is None:
                continue
            d_in, d_out = dims[m.name]
            if c.compeft is None:
                want.setdefault(u_key(c.id, m.name), ((d_out, r), manifest.basis_dtype, []))[2].append(name)
                want.setdefault(v_key(c.id, m.name), ((d_in, r), manifest.basis_dtype, []))[2].append(name)
            else:
                want.setdefault(compeft_key(c.id), ((-1,), "u8", []))[2].append(name)
            shape = (-1, r, r) if manifest.sigma == "full" else (-1, r)
            want.setdefault(sigma_key(c.id, a.block, m.name), (shape, manifest.sigma_dtype, []))[2].append(name)
    return want


def _header_problem(f, key: str, shape: tuple[int, ...], dtype: str) -> str | None:
    if key not in f.keys():
        return f"tensor {key} is not in its shard"
    sl = f.get_slice(key)
    got = tuple(sl.get_shape())
    if len(got) != len(shape) or any(w not in (-1, g) for w, g in zip(shape, got, strict=True)):
        return f"tensor {key} has shape {list(got)}, the manifest needs {['k' if w < 0 else w for w in shape]}"
    expected = {"u8": "U8", "fp32": "F32", "bf16": "BF16", "fp16": "F16", "int8": "I8"}[dtype]
    if sl.get_dtype() != expected:
        return f"tensor {key} is {sl.get_dtype()}, the manifest says {expected}"
    if dtype == "int8" and key + SCALE_SUFFIX not in f.keys():
        return f"int8 tensor {key} has no {key}{SCALE_SUFFIX}"
    return None


def check_store(store: str | Path, manifest: Manifest, values: bool = True) -> Findings:
    """Check every tensor the manifest's adapters read (shard paths, presence, shapes, dtypes, Σ
    rows in range, and with ``values`` every entry); see the module docstring for whom each
    problem concerns. Entries set aside on read are adapter problems too."""
    store = Path(store)
    found = Findings(adapters=dict(manifest.broken))
    _check_tables(manifest, found)
    if found.store:
        return found
    want = _expected(manifest)
    by_shard: dict[str, list[str]] = {}
    for key, (_, _, users) in want.items():
        shard = manifest.weight_map.get(key)
        if shard is None:
            found.blame(users, f"tensor {key} is missing from the store")
        else:
            by_shard.setdefault(shard, []).append(key)
    for shard, keys in by_shard.items():
        try:
            with safe_open(str(shard_path(store, shard)), framework="pt") as f:
                for key in keys:
                    shape, dtype, users = want[key]
                    if (why := _header_problem(f, key, shape, dtype)) is not None:
                        found.blame(users, why)
                    elif key.startswith("sigma."):
                        k = f.get_slice(key).get_shape()[0]
                        for name in users:
                            if (row := manifest.adapters[name].row) >= k:
                                found.blame([name], f"Σ row {row} is beyond the {k} rows of {key}")
        except StoreError as e:
            found.blame(sorted({u for key in keys for u in want[key][2]}), str(e))
        except Exception as e:  # safetensors' own errors for a corrupt or truncated header
            found.blame(sorted({u for key in keys for u in want[key][2]}), f"cannot read shard {shard}: {e}")
    if values:
        _check_values(store, manifest, want, found)
    return found


def _check_tables(manifest: Manifest, found: Findings) -> None:
    names = [m.name for m in manifest.modules]
    if len(set(names)) != len(names):
        found.store.append("the module table names a module twice")
    if any(m.d_in < 1 or m.d_out < 1 for m in manifest.modules):
        found.store.append("the module table has a module with a dimension < 1")
    if [c.id for c in manifest.clusters] != list(range(len(manifest.clusters))):
        found.store.append("cluster ids are not 0, 1, 2, … in order")
    if any(c.rank < 1 for c in manifest.clusters):
        found.store.append("a cluster has rank < 1")


def _check_values(store: Path, manifest: Manifest, want: dict, found: Findings) -> None:
    """Every basis and Σ row the remaining adapters read: finite and within ``MAX_VALUE``."""
    reader = TensorReader(store, manifest)
    for key, (_, _, users) in sorted(want.items()):
        live = [u for u in users if u not in found.adapters]
        if not live:
            continue
        try:
            if key.startswith("compeft."):
                c = int(key.split(".")[1])
                mods = manifest.clusters[c].compeft.ranks
                xs = [reader.get(k(c, m)) for m in mods for k in (u_key, v_key)]
                why = next((w for x in xs if (w := bad_value(x)) is not None), None)
            elif key.startswith("sigma."):
                x = reader.get(key)
                bad = set(bad_rows(x).tolist())
                for u in live:
                    if manifest.adapters[u].row in bad:
                        found.blame([u], f"Σ row {manifest.adapters[u].row} of {key} has NaN, Inf or entries "
                                         f"beyond {MAX_VALUE:g}")
                continue
            else:
                why = bad_value(reader.get(key))
                why = None if why is None else f"basis {key} {why}"
        except (StoreError, ValueError, RuntimeError) as e:
            why = str(e)
        if why is not None:
            found.blame(live, why)

