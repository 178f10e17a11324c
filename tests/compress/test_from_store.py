"""`compress --from-store`: re-cluster a store with its added adapters (issue: scheduling/recompression)."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from helpers import TINY_MODULES, dense_update

from vllm_jd.cli import main as cli
from vllm_jd.compress.synthetic import make_adapters
from vllm_jd.store.format import read_manifest


@pytest.fixture
def grown_store(tmp_path):
    make_adapters(tmp_path / "a", 6, TINY_MODULES, rank=4, structure="shared", seed=21)
    make_adapters(tmp_path / "b", 2, TINY_MODULES, rank=4, structure="random", seed=22, prefix="late")
    store = tmp_path / "s"
    assert cli(["-q", "compress", str(tmp_path / "a"), "--out", str(store), "--rank", "4", "--clusters", "1"]) == 0
    assert cli(["-q", "add", str(store), str(tmp_path / "b"), "--max-error", "0.3"]) == 0  # two exact singletons
    return tmp_path, store


def test_uses_unchanged_sources_like_a_fresh_compress(grown_store):
    tmp, store = grown_store
    args = ["--rank", "8", "--clusters", "2", "--seed", "3"]
    assert cli(["-q", "compress", "--from-store", str(store), "--out", str(tmp / "new"), "--recluster-exact",
                *args]) == 0
    assert cli(["-q", "compress", str(tmp / "a"), str(tmp / "b"), "--out", str(tmp / "direct"), *args]) == 0
    new, direct, old = (read_manifest(tmp / n) for n in ("new", "direct", "s"))
    assert list(new.adapters) == list(direct.adapters) == list(old.adapters)
    for name, a in new.adapters.items():
        assert a.checksum == old.adapters[name].checksum
        assert a.error == pytest.approx(direct.adapters[name].error, rel=1e-6, abs=1e-9)
    assert all(c.kind == "shared" for c in new.clusters)  # the late adapters are re-clustered too


def test_rebuilds_from_the_store_when_sources_are_gone(grown_store, caplog):
    tmp, store = grown_store
    originals = {m: dense_update(tmp / "b" / "late-0000", m) for m in TINY_MODULES}
    shutil.rmtree(tmp / "b")  # the added adapters' folders are gone; one of a's is changed
    make_adapters(tmp / "a", 1, TINY_MODULES, rank=4, structure="random", seed=99)
    from vllm_jd.compress.from_store import StoredAdapter
    from vllm_jd.store.format import TensorReader

    rebuilt = StoredAdapter(TensorReader(store, read_manifest(store)), "late-0000")
    for m, p in originals.items():  # an exact singleton is rebuilt exactly
        a, bt = rebuilt.factors(m)
        torch.testing.assert_close(bt.T.double() @ a.double(), p, rtol=1e-5, atol=1e-6)
    with caplog.at_level(logging.WARNING):
        assert cli(["-q", "compress", "--from-store", str(store), "--out", str(store), "--rank", "4",
                    "--clusters", "3", "--recluster-exact"]) == 0  # in place
    assert "3 of 8 adapters are rebuilt" in caplog.text and "late-0000" in caplog.text
    m = read_manifest(store)
    assert len(m.adapters) == 8 and len(m.clusters) == 3
    assert m.adapters["late-0000"].source == str(tmp / "b" / "late-0000")  # still points at the original
    # the new store's error for a rebuilt adapter is its error against the original update
    assert cli(["-q", "export", str(store), "late-0000", "--out", str(tmp / "e")]) == 0
    num = sum(float(((dense_update(tmp / "e", mod) - p) ** 2).sum()) for mod, p in originals.items())
    den = sum(float((p**2).sum()) for p in originals.values())
    assert m.adapters["late-0000"].error == pytest.approx((num / den) ** 0.5, rel=1e-4)


def test_name_given_twice_is_refused(grown_store):
    tmp, store = grown_store
    assert cli(["-q", "compress", str(tmp / "a"), "--from-store", str(store), "--out", str(tmp / "x")]) == 2
    assert not (tmp / "x").exists()
    assert cli(["-q", "compress", "--out", str(tmp / "y")]) == 2


def test_exact_singletons_stay_exact_by_default(grown_store):
    tmp, store = grown_store
    old = read_manifest(store)
    assert cli(["-q", "compress", "--from-store", str(store), "--out", str(store), "--rank", "auto",
                "--clusters", "auto"]) == 0
    m = read_manifest(store)
    assert set(m.adapters) == set(old.adapters)
    for name in ("late-0000", "late-0001"):  # exact before, exact after: not refitted under a mean-error target
        assert m.clusters[m.adapters[name].cluster].kind == "exact" and m.adapters[name].error == 0.0
        assert cli(["-q", "export", str(store), name, "--out", str(tmp / f"e-{name}")]) == 0
        for mod in TINY_MODULES:
            torch.testing.assert_close(dense_update(tmp / f"e-{name}", mod), dense_update(tmp / "b" / name, mod),
                                       rtol=1e-5, atol=1e-6)
    assert sum(c.kind == "shared" for c in m.clusters) >= 1


def test_recluster_exact_needs_from_store(grown_store, capsys):
    tmp, _ = grown_store
    assert cli(["-q", "compress", str(tmp / "a"), "--out", str(tmp / "z"), "--recluster-exact"]) == 2
    assert "--recluster-exact applies to --from-store" in capsys.readouterr().err
