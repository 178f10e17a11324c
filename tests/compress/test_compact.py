"""``vllm-jd compact``: what no adapter reads is dropped, every adapter's U_c, Σ_i, V_c stay bit-for-bit
the same, a store with nothing to drop is not touched, and entries that point by the old numbering
stop it before anything changes."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import TINY_MODULES, tree_digest

from vllm_jd.cli import main as cli
from vllm_jd.compress.synthetic import make_adapters
from vllm_jd.store.format import TensorReader, read_manifest, sigma_key, u_key, v_key
from vllm_jd.store.transaction import leftovers
from vllm_jd.store.validate import check_store

Q_ONLY = {k: v for k, v in TINY_MODULES.items() if k.endswith("q_proj")}


def served(store) -> dict[str, dict[str, tuple]]:
    """Every adapter's (U_c, Σ_i, V_c) per module it has, as a server reads them (float32)."""
    m = read_manifest(store)
    reader = TensorReader(store, m)
    out = {}
    for name, a in m.adapters.items():
        out[name] = {mod.name: (reader.get(u_key(a.cluster, mod.name)), reader.sigma(name, mod.name),
                                reader.get(v_key(a.cluster, mod.name)))
                     for mod, err in zip(m.modules, a.module_errors, strict=True) if err is not None}
    return out


def assert_same(before, after) -> None:
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].keys() == after[name].keys(), name
        for mod, tensors in before[name].items():
            assert all(torch.equal(x, y) for x, y in zip(tensors, after[name][mod], strict=True)), (name, mod)


@pytest.fixture(params=["fp32", "int8"])
def grown(tmp_path, request):
    """A one-cluster store of 6 adapters (2 on q_proj only), 3 singletons added later, int8 or not."""
    make_adapters(tmp_path / "a", 4, TINY_MODULES, rank=4, structure="shared", seed=21)
    make_adapters(tmp_path / "a", 2, Q_ONLY, rank=4, structure="shared", seed=21, prefix="qonly")
    make_adapters(tmp_path / "b", 3, TINY_MODULES, rank=4, structure="random", seed=22, prefix="late")
    store = tmp_path / "s"
    dt = request.param
    assert cli(["-q", "compress", str(tmp_path / "a"), "--out", str(store), "--rank", "4", "--clusters", "1",
                "--basis-dtype", dt, "--sigma-dtype", dt]) == 0
    for i in range(3):  # one add each: three Σ blocks
        assert cli(["-q", "add", str(store), str(tmp_path / "b" / f"late-000{i}")]) == 0
    return store


def test_compaction_drops_what_nobody_reads_and_keeps_every_adapter_exactly(grown, capsys):
    m0 = read_manifest(grown)
    assert len(m0.clusters) == 4 and {a.block for a in m0.adapters.values()} == {0, 1, 2, 3}
    assert cli(["-q", "remove", str(grown), "late-0001", "adapter-0002"]) == 0
    before = served(grown)
    capsys.readouterr()
    assert cli(["-q", "compact", str(grown), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["changed"] and r["clusters"] == [4, 3]
    assert r["sigma_rows"][1] < r["sigma_rows"][0] and r["bytes"][1] < r["bytes"][0]
    m = read_manifest(grown)
    assert [c.id for c in m.clusters] == [0, 1, 2] and m.generation != m0.generation
    assert {a.block for a in m.adapters.values()} == {0} and m.next_block == 1
    # rows are the members in name order, no gaps; q_proj-only adapters hold zero rows in the other modules
    shared = sorted(n for n, a in m.adapters.items() if a.cluster == 0)
    assert [m.adapters[n].row for n in shared] == list(range(len(shared)))
    assert_same(before, served(grown))
    assert check_store(grown, m).ok and leftovers(grown, m) == []
    k_proj = next(k for k in TINY_MODULES if k.endswith("k_proj"))
    assert reader_rows(grown, sigma_key(0, 0, k_proj)) == len(shared) == 5  # 2 of them without k_proj
    assert not TensorReader(grown, m).stored(sigma_key(0, 0, k_proj))[[shared.index("qonly-0000")]].any()
    capsys.readouterr()
    assert cli(["compact", str(grown)]) == 0  # a second run has nothing to drop
    assert "nothing to compact" in capsys.readouterr().out


def assert_refused(store, capsys, *says: str) -> None:
    """compact exits 2 with one line naming ``says`` and leaves ``store`` byte-for-byte as it was."""
    digest = tree_digest(store)
    capsys.readouterr()
    assert cli(["-q", "compact", str(store)]) == 2
    err = capsys.readouterr().err
    assert all(x in err for x in says) and err.count("\n") == 1, err
    assert tree_digest(store) == digest


def reader_rows(store, key: str) -> int:
    return TensorReader(store, read_manifest(store)).stored(key).shape[0]


def test_nothing_to_drop_leaves_the_store_untouched(tmp_path, capsys):
    make_adapters(tmp_path / "a", 4, TINY_MODULES, rank=4, structure="shared", seed=3)
    store = tmp_path / "s"
    assert cli(["-q", "compress", str(tmp_path / "a"), "--out", str(store), "--rank", "4", "--clusters", "2"]) == 0
    digest = tree_digest(store)
    assert cli(["-q", "compact", str(store)]) == 0
    assert "nothing to compact" in capsys.readouterr().out
    assert tree_digest(store) == digest


def test_quarantined_entries_stop_compaction_before_anything_changes(grown, capsys):
    assert cli(["-q", "remove", str(grown), "late-0001"]) == 0
    manifest = json.loads((grown / "manifest.json").read_text())
    manifest["adapters"]["late-0002"]["row"] = 99  # points past its Σ block: fsck --repair quarantines it
    (grown / "manifest.json").write_text(json.dumps(manifest))
    assert cli(["-q", "fsck", str(grown), "--repair"]) == 0
    assert_refused(grown, capsys, "late-0002", "remove")
    assert cli(["-q", "remove", str(grown), "late-0002"]) == 0  # the way out the error names
    assert cli(["-q", "compact", str(grown)]) == 0
    assert "late-0002" not in read_manifest(grown).quarantined


def test_a_store_written_by_a_newer_version_is_not_compacted(grown, capsys):
    assert cli(["-q", "remove", str(grown), "late-0001"]) == 0
    manifest = json.loads((grown / "manifest.json").read_text())
    shard = next(iter(manifest["weight_map"].values()))
    manifest["weight_map"]["lut.0.model.layers.0.self_attn.q_proj"] = shard  # a tensor kind we do not know
    (grown / "manifest.json").write_text(json.dumps(manifest))
    assert_refused(grown, capsys, "lut.0.")


def test_compeft_payloads_are_carried_over_bit_for_bit(tmp_path):
    make_adapters(tmp_path / "a", 3, TINY_MODULES, rank=4, structure="random", seed=5)
    store = tmp_path / "s"
    assert cli(["-q", "compress", str(tmp_path / "a"), "--out", str(store), "--method", "compeft"]) == 0
    assert cli(["-q", "remove", str(store), "adapter-0000"]) == 0
    before = served(store)
    assert cli(["-q", "compact", str(store)]) == 0
    m = read_manifest(store)
    assert len(m.clusters) == 2 and all(c.compeft is not None for c in m.clusters)
    assert_same(before, served(store))
    assert check_store(store, m).ok


def test_a_store_compacted_to_nothing_still_inspects(grown, capsys):
    assert cli(["-q", "remove", str(grown), *read_manifest(grown).adapters]) == 0
    assert cli(["-q", "compact", str(grown)]) == 0
    assert read_manifest(grown).clusters == []
    assert cli(["-q", "inspect", str(grown)]) == 0
    assert cli(["-q", "fsck", str(grown)]) == 0


def test_a_row_past_its_block_is_refused_in_one_line(grown, capsys):
    assert cli(["-q", "remove", str(grown), "late-0001"]) == 0  # something to compact
    manifest = json.loads((grown / "manifest.json").read_text())
    manifest["adapters"]["adapter-0001"]["row"] = 99  # hand-edited: read_manifest checks cluster and block only
    (grown / "manifest.json").write_text(json.dumps(manifest))
    assert_refused(grown, capsys, "adapter-0001", "row 99")


def test_a_recompression_that_a_compaction_overtook_writes_nothing(grown, monkeypatch, capsys):
    from vllm_jd.compress import pipeline

    assert cli(["-q", "remove", str(grown), "late-0001"]) == 0
    real_publish = pipeline.publish

    def publish_after_a_compaction(staging, manifest, merge=None):
        assert cli(["-q", "compact", str(grown)]) == 0  # renumbers every entry the recompression read
        return real_publish(staging, manifest, merge)

    monkeypatch.setattr(pipeline, "publish", publish_after_a_compaction)
    capsys.readouterr()
    rc = cli(["-q", "compress", "--from-store", str(grown), "--out", str(grown), "--rank", "4", "--clusters", "2"])
    compacted_before = served(grown)
    assert rc == 2 and "became another version" in capsys.readouterr().err
    monkeypatch.setattr(pipeline, "publish", real_publish)
    assert cli(["-q", "compact", str(grown)]) == 0
    assert "nothing" in capsys.readouterr().out  # the compacted version stands, untouched
    assert_same(compacted_before, served(grown))
