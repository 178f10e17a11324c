"""ComPEFT inside a store: `compress --method compeft` and `add --exact-as compeft` singletons."""

from __future__ import annotations

import logging
import math
import shutil

import pytest
import torch
from helpers import TINY_MODULES, dense_update, tree_digest

from vllm_jd.cli import main as cli
from vllm_jd.compress.peft_io import open_adapter
from vllm_jd.compress.report import summarize
from vllm_jd.compress.synthetic import make_adapters
from vllm_jd.store.compeft import fp16
from vllm_jd.store.format import TensorReader, compeft_key, read_manifest, u_key
from vllm_jd.store.ternary_codec import mask_bits


def _measured_error(src, exported) -> float:
    num = den = 0.0
    for m in TINY_MODULES:
        p, q = dense_update(src, m), dense_update(exported, m)
        num += float(((p - q) ** 2).sum())
        den += float((p**2).sum())
    return math.sqrt(num / den)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("compeft")
    make_adapters(root / "a", 4, TINY_MODULES, rank=4, structure="shared", seed=11, alpha=8)
    return root / "a"


@pytest.mark.parametrize("encoding", ["golomb", "masks"])
def test_compeft_store_round_trip(tmp_path, adapters, encoding):
    store = tmp_path / "s"
    assert cli(["-q", "compress", str(adapters), "--out", str(store), "--method", "compeft", "--density", "0.4",
                "--alpha", "1.5", "--encoding", encoding]) == 0
    m = read_manifest(store)
    assert m.method == "compeft" and {c.kind for c in m.clusters} == {"compeft"} and len(m.clusters) == 4
    reader = TensorReader(store, m)
    d = sum(4 * (d_in + d_out) for d_in, d_out in TINY_MODULES.values())
    for name, info in m.adapters.items():
        c = m.clusters[info.cluster]
        assert c.compeft.d == d and (encoding == "golomb" or c.compeft.bits == mask_bits(d))
        assert not any(k.startswith(("U.", "V.")) for k in m.weight_map)  # bases only in the payload
        assert reader.has(u_key(c.id, next(iter(TINY_MODULES))))
        out = tmp_path / "e" / name
        assert cli(["-q", "export", str(store), name, "--out", str(out)]) == 0
        assert info.error == pytest.approx(_measured_error(adapters / name, out), rel=1e-5)
        # the exported factors are ComPEFT's: lora_A = A′ ∈ {−c, 0, c}, c = fp16(α·std(all raw A, B))
        src = open_adapter(name, adapters / name)
        raw = torch.cat([t.reshape(-1) for mod in sorted(src.modules) for t in src.raw_factors(mod)])
        c_val = fp16(1.5 * float(raw.double().std()))
        a, _ = open_adapter(name, out).raw_factors(next(iter(TINY_MODULES)))
        assert set(a.unique().tolist()) <= {-c_val, 0.0, c_val}
    s = summarize(store)
    assert s["cluster_kinds"] == {"compeft": 4}
    assert s["compeft"]["params"] == 4 * d and s["compeft"]["encodings"] == [encoding]
    assert s["compeft"]["bits"] == sum(c.compeft.bits for c in m.clusters)
    if encoding == "masks":
        assert s["compeft"]["bits_per_param"] == pytest.approx(2 + 16 / d)
    assert cli(["inspect", str(store)]) == 0
    payload = sum(reader._raw(compeft_key(i)).numel() for i in range(4))
    assert s["bytes_stored"]["bases"] == payload


def test_add_exact_as_compeft(tmp_path, adapters):
    store = tmp_path / "s"
    assert cli(["-q", "compress", str(adapters), "--out", str(store), "--rank", "4", "--clusters", "1"]) == 0
    far = make_adapters(tmp_path / "far", 1, TINY_MODULES, rank=4, structure="random", seed=3, prefix="far")[0]
    assert cli(["-q", "add", str(store), str(far), "--max-error", "0.2", "--exact-as", "compeft",
                "--density", "0.9"]) == 0
    m = read_manifest(store)
    info = m.adapters["far-0000"]
    c = m.clusters[info.cluster]
    assert c.kind == "compeft" and c.compeft.density == 0.9 and compeft_key(c.id) in m.weight_map
    assert cli(["-q", "export", str(store), "far-0000", "--out", str(tmp_path / "e")]) == 0
    assert info.error == pytest.approx(_measured_error(far, tmp_path / "e"), rel=1e-5)
    assert info.error > 0  # lossy (ComPEFT optimises task accuracy, not ‖ΔW − ΔW′‖)
    from vllm_jd.serving.bank import load_bank

    bank = load_bank(store)  # serving decodes the payload like any basis
    mod = next(iter(TINY_MODULES))
    assert torch.equal(bank.U[mod][c.id][:, : c.rank], TensorReader(store, m).get(u_key(c.id, mod)))
    assert bank.U[mod][c.id].abs().sum() > 0


def test_compeft_bad_settings_leave_nothing(tmp_path, adapters):
    store = tmp_path / "s"
    assert cli(["-q", "compress", str(adapters), "--out", str(store), "--rank", "4", "--clusters", "1"]) == 0
    before = tree_digest(store)
    far = make_adapters(tmp_path / "far", 1, TINY_MODULES, rank=4, structure="random", seed=3, prefix="far")[0]
    assert cli(["-q", "add", str(store), str(far), "--max-error", "0.2", "--exact-as", "compeft",
                "--density", "5"]) == 2
    assert tree_digest(store) == before
    for extra in (["--rank", "4"], ["--alpha", "0"], ["--basis-dtype", "int8"]):
        out = tmp_path / ("x" + extra[0])
        assert cli(["-q", "compress", str(adapters), "--out", str(out), "--method", "compeft", *extra]) == 2
        assert not out.exists()


def test_warns_when_a_factor_is_dropped_entirely(tmp_path, caplog):
    # random synthetic adapters: B entries are ~4x larger than A's, so at k = 0.1 all kept entries are in B
    far = make_adapters(tmp_path / "a", 1, TINY_MODULES, rank=4, structure="random", seed=5)[0]
    with caplog.at_level(logging.WARNING):
        assert cli(["-q", "compress", str(far.parent), "--out", str(tmp_path / "s"), "--method", "compeft",
                    "--density", "0.1"]) == 0
    assert "keeps no entry of A or of B" in caplog.text
    assert read_manifest(tmp_path / "s").adapters["adapter-0000"].error == pytest.approx(1.0)
    shutil.rmtree(tmp_path / "s")
