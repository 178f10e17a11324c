"""Tampered and damaged stores: each problem is found before anything is served, blamed on exactly
the adapters it concerns, and never makes the rest of the store unusable; `inspect` exits 2 with
the reason, `fsck --repair` quarantines (keeps the entry, stops serving it)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import TINY_MODULES
from safetensors.torch import load_file, save_file

from vllm_jd.cli import main as cli
from vllm_jd.compress.synthetic import make_adapters
from vllm_jd.store.format import read_manifest, sigma_key, u_key
from vllm_jd.store.validate import check_store

MOD = next(iter(TINY_MODULES))
VICTIM = "adapter-0001"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("validate")
    make_adapters(root / "a", 6, TINY_MODULES, rank=4, structure="planted:2", seed=5)
    make_adapters(root / "late", 1, TINY_MODULES, rank=4, structure="random", seed=6, prefix="late")
    assert cli(["-q", "compress", str(root / "a"), "--out", str(root / "store"), "--rank", "4", "--clusters", "2"]) == 0
    return root


def edit_manifest(store: Path, fn) -> None:
    raw = json.loads((store / "manifest.json").read_text())
    fn(raw)
    (store / "manifest.json").write_text(json.dumps(raw, allow_nan=True))


def edit_tensor(store: Path, key: str, fn) -> None:
    shard = store / read_manifest(store).weight_map[key]
    t = load_file(str(shard))
    t[key] = fn(t[key])
    save_file(t, str(shard))


def entry(store: Path) -> dict:
    return read_manifest(store).adapters[VICTIM]


def set_field(field, value):
    return lambda s: edit_manifest(s, lambda raw: raw["adapters"][VICTIM].__setitem__(field, value))


def nan_sigma_row(s):
    a = entry(s)

    def poison(x):
        x[a.row] = float("nan")
        return x
    edit_tensor(s, sigma_key(a.cluster, a.block, MOD), poison)


def inf_basis(s):
    edit_tensor(s, u_key(entry(s).cluster, MOD), lambda x: x.index_fill(0, torch.tensor([0]), float("inf")))


def wrong_shape(s):
    edit_tensor(s, u_key(entry(s).cluster, MOD), lambda x: torch.zeros(x.shape[0], x.shape[1] + 1))


def missing_block(s):
    a = entry(s)
    edit_manifest(s, lambda raw: raw["weight_map"].pop(sigma_key(a.cluster, a.block, MOD)))


def escaping_shard(s):
    key = u_key(entry(s).cluster, MOD)
    (s.parent / "outside.safetensors").write_bytes((s / read_manifest(s).weight_map[key]).read_bytes())
    edit_manifest(s, lambda raw: raw["weight_map"].__setitem__(key, "../outside.safetensors"))


def truncated_shard(s):
    shard = s / read_manifest(s).weight_map[u_key(entry(s).cluster, MOD)]
    shard.write_bytes(shard.read_bytes()[:100])


def bad_name(s):
    edit_manifest(s, lambda raw: raw["adapters"].__setitem__("evil\u202ename", raw["adapters"].pop(VICTIM)))


# case → (tamper, who is blamed: "victim" alone or "cluster" = every adapter of the victim's cluster, words of the reason)
CASES = {
    "error null": (set_field("error", None), "victim", "error"),  # once bricked the whole store
    "error NaN": (set_field("error", float("nan")), "victim", "error"),
    "cluster out of range": (set_field("cluster", 99), "victim", "cluster 99 does not exist"),
    "negative row": (set_field("row", -1), "victim", "row -1 is negative"),
    "row beyond its block": (set_field("row", 1000), "victim", "Σ row 1000 is beyond"),
    "NaN in a Σ row": (nan_sigma_row, "victim", "NaN, Inf"),
    "Inf in a basis": (inf_basis, "cluster", "NaN or Inf"),
    "wrong tensor shape": (wrong_shape, "cluster", "has shape"),
    "missing Σ block": (missing_block, "block", "missing from the store"),
    "shard path outside the store": (escaping_shard, "cluster", "not tensors/<file>"),
    "truncated shard": (truncated_shard, "shard", "cannot read shard"),
    "bad name": (bad_name, "renamed", "U+202E"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tampered_store(case, pristine, tmp_path, capsys):
    store = tmp_path / "store"
    shutil.copytree(pristine / "store", store)
    before = read_manifest(store)
    tamper, blamed, reason = CASES[case]
    tamper(store)
    victim_cluster = before.adapters[VICTIM].cluster
    expect = {"victim": {VICTIM}, "renamed": {"evil\u202ename"}, "block": {VICTIM} | {
        n for n, a in before.adapters.items() if a.cluster == victim_cluster},
        "cluster": {n for n, a in before.adapters.items() if a.cluster == victim_cluster},
        "shard": set(before.adapters)}[blamed]
    found = check_store(store, read_manifest(store))
    assert set(found.adapters) == expect, found
    assert all(reason in why for n, why in found.adapters.items()), found.adapters
    assert not found.store
    capsys.readouterr()
    assert cli(["inspect", str(store)]) == 2  # reported, with the reason, instead of a traceback or silence
    out = capsys.readouterr().out
    assert reason in out and "PROBLEM" in out
    # the rest of the store stays usable: add and export work
    assert cli(["-q", "add", str(store), str(pristine / "late" / "late-0000")]) == 0
    healthy = sorted(set(before.adapters) - expect)
    if healthy:
        assert cli(["-q", "export", str(store), healthy[0], "--out", str(tmp_path / "e")]) == 0
    assert cli(["fsck", str(store)]) == 1
    assert cli(["fsck", str(store), "--repair"]) == 0
    m = read_manifest(store)
    assert set(m.quarantined) == expect and not expect & set(m.adapters)  # kept, set aside, not lost
    assert all(reason in q["reason"] for q in m.quarantined.values())
    assert cli(["-q", "inspect", str(store)]) == 0 and cli(["fsck", str(store)]) == 0
    assert cli(["-q", "export", str(store), sorted(expect)[0], "--out", str(tmp_path / "q")]) == 2


def test_store_problems_refuse_the_store(pristine, tmp_path, capsys):
    store = tmp_path / "store"
    shutil.copytree(pristine / "store", store)
    edit_manifest(store, lambda raw: raw["modules"].append(dict(raw["modules"][0])))
    capsys.readouterr()
    assert cli(["inspect", str(store)]) == 2
    assert "names a module twice" in capsys.readouterr().out
    assert cli(["fsck", str(store), "--repair"]) == 1  # cannot be repaired in place


def test_values_that_would_overflow_are_never_written(pristine, tmp_path):
    from vllm_jd.store.format import write_manifest

    m = read_manifest(pristine / "store")
    m.adapters[VICTIM].error = float("nan")  # assignment skips pydantic's check: write_manifest is the last guard
    (tmp_path / "s").mkdir()
    with pytest.raises(ValueError):
        write_manifest(tmp_path / "s", m)
    assert not (tmp_path / "s" / "manifest.json").exists()


@pytest.mark.parametrize("name", ["a\nb", "x" * 1000, "../evil", "/abs", "rtl\u202eoverride", "", "tab\tname"])
def test_bad_names_are_refused(pristine, tmp_path, name):
    from vllm_jd.compress.project import add_named
    from vllm_jd.store.errors import AdapterError

    store = tmp_path / "store"
    shutil.copytree(pristine / "store", store)
    before = (store / "manifest.json").read_bytes()
    with pytest.raises(AdapterError):
        add_named(store, [(name, pristine / "late" / "late-0000")])
    assert (store / "manifest.json").read_bytes() == before
