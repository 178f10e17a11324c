"""`vllm-jd verify` against the originals: ~perfect for a lossless store and for exact
singletons; a damaged adapter (its Σ scaled by 0.3) flagged, exit 1, and `--repair` brings it
back to exact; bad inputs exit 2 with the reason; the store unchanged without --repair."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import tree_digest
from safetensors.torch import load_file, save_file

from vllm_jd.cli import main as cli
from vllm_jd.compress.synthetic import make_adapters
from vllm_jd.quality.prompts import DEFAULT_PROMPTS, read_prompts
from vllm_jd.store.format import read_manifest, sigma_key
from vllm_jd.tiny_model import llama_lora_modules, make_tiny_llama

PROMPTS = ["def hello(", "The capital of", "Once upon a time", "SELECT name"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    model = make_tiny_llama(root / "model", dtype=torch.float32)
    mods = llama_lora_modules()
    make_adapters(root / "ad", 3, mods, rank=8, structure="shared", seed=0, alpha=64)
    far = make_adapters(root / "far", 1, mods, rank=8, structure="random", seed=9, alpha=64, prefix="far")[0]
    store = root / "store"
    assert cli(["-q", "compress", str(root / "ad"), "--out", str(store), "--rank", "24", "--clusters", "1"]) == 0
    assert cli(["-q", "add", str(store), str(far), "--max-error", "0.01"]) == 0  # an exact singleton
    prompts = root / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS))
    return {"root": root, "model": model, "store": store, "prompts": prompts}


def run(setup, store, *extra, capsys=None):
    code = cli(["-q", "verify", str(store), "--model", str(setup["model"]), "--prompts", str(setup["prompts"]),
                "--max-tokens", "8", "--json", *extra])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")] if capsys else []
    return code, lines


def test_lossless_store_and_exact_singletons_agree_with_their_originals(setup, capsys):
    before = tree_digest(setup["store"])
    code, lines = run(setup, setup["store"], capsys=capsys)
    assert code == 0 and len(lines) == 4
    for r in lines:
        assert r["agreement"] == 1.0 and r["kl"] < 1e-5 and r["tokens"] == 4 * 8 and r["passes"], r
    assert {r["name"]: r["kind"] for r in lines}["far-0000"] == "exact"
    assert tree_digest(setup["store"]) == before  # verify alone writes nothing


def damage(store, name, factor):
    m = read_manifest(store)
    info = m.adapters[name]
    for mod in m.modules:
        key = sigma_key(info.cluster, info.block, mod.name)
        shard = store / m.weight_map[key]
        tensors = load_file(str(shard))
        tensors[key][info.row] *= factor
        save_file(tensors, str(shard))


def test_a_damaged_adapter_is_flagged_and_repair_makes_it_exact(setup, capsys, monkeypatch):
    from vllm_jd.quality.verify import Scorer

    loads = []
    real_load = Scorer._load
    monkeypatch.setattr(Scorer, "_load", lambda self: (loads.append(self.model), real_load(self))[1])
    store = setup["root"] / "damaged"
    shutil.copytree(setup["store"], store)
    damage(store, "adapter-0001", 0.3)
    before = tree_digest(store)
    code, lines = run(setup, store, capsys=capsys)
    assert code == 1
    by = {r["name"]: r for r in lines}
    assert not by["adapter-0001"]["passes"] and by["adapter-0001"]["kl"] > 1e-3
    assert all(r["passes"] for n, r in by.items() if n != "adapter-0001")
    assert tree_digest(store) == before
    loads.clear()
    code, lines = run(setup, store, "--repair", capsys=capsys)
    assert code == 0 and len(loads) == 1  # verify, repair, verify again: the model is read once
    after = [r for r in lines if r.get("stage") == "after repair"]
    assert [(r["name"], r["kind"], r["agreement"]) for r in after] == [("adapter-0001", "exact", 1.0)]
    m = read_manifest(store)
    assert m.clusters[m.adapters["adapter-0001"].cluster].kind == "exact"
    assert m.adapters["adapter-0001"].source == read_manifest(setup["store"]).adapters["adapter-0001"].source
    assert cli(["-q", "fsck", str(store)]) == 0


def test_bad_inputs_exit_2_with_the_reason(setup, tmp_path, capsys):
    store = tmp_path / "store"
    shutil.copytree(setup["store"], store)
    before = tree_digest(store)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    other = make_tiny_llama(tmp_path / "other", hidden=128, dtype=torch.float32)
    shutil.copytree(setup["root"] / "far", tmp_path / "far-moved")
    capsys.readouterr()  # the model writer's progress bar
    unknown, partial = tmp_path / "unknown.jsonl", tmp_path / "partial.jsonl"
    unknown.write_text(json.dumps({"prompt": "x", "adapters": ["adapter-0000", "nope"]}) + "\n")
    partial.write_text(json.dumps({"prompt": "x", "adapter": "adapter-0000"}) + "\n")
    cases = [(["--prompts", str(empty)], "no prompts in it"),
             (["--prompts", str(unknown)], "the prompts name adapters not in"),
             (["--prompts", str(partial)], "no prompts for 3 adapter(s)"),
             (["--model", str(other)], "built for another model"),
             (["--adapters", "nope"], "not in"),
             (["--threshold", "2"], "expected a fraction")]
    for extra, says in cases:
        args = ["-q", "verify", str(store), "--model", str(setup["model"]), "--prompts", str(setup["prompts"]), *extra]
        assert cli(args) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1, err
    shutil.rmtree(setup["root"] / "far")  # the singleton's original is gone
    try:
        assert cli(["-q", "verify", str(store), "--model", str(setup["model"])]) == 2
        assert "far-0000" in (err := capsys.readouterr().err) and "no longer exists" in err, err
        shutil.move(setup["root"] / "ad" / "adapter-0001", tmp_path / "adapter-0001")  # and a second one
        assert cli(["-q", "verify", str(store), "--model", str(setup["model"])]) == 2
        err = capsys.readouterr().err
        assert "2 adapters cannot be verified" in err and "far-0000" in err and "adapter-0001" in err, err
        assert err.count("\n") == 1, err
    finally:
        shutil.copytree(tmp_path / "far-moved", setup["root"] / "far")
        if (tmp_path / "adapter-0001").exists():
            shutil.move(tmp_path / "adapter-0001", setup["root"] / "ad" / "adapter-0001")
    assert tree_digest(store) == before


def test_prompt_files():
    assert read_prompts(None).shared == list(DEFAULT_PROMPTS) and len(DEFAULT_PROMPTS) == 16
    with pytest.raises(ValueError, match="cannot read it"):
        read_prompts("/no/such/file.jsonl")


def test_prompts_of_one_adapter_are_measured_on_it_only(setup, tmp_path, capsys):
    """A line with "adapters" adds to those adapters' shared prompts: each adapter can be measured
    on its own traffic (a provider's per-customer prompts)."""
    path = tmp_path / "own.jsonl"
    path.write_text("\n".join([json.dumps(PROMPTS[0]), json.dumps({"prompt": PROMPTS[1], "adapters": ["adapter-0001"]}),
                               json.dumps({"prompt": PROMPTS[2], "adapter": "far-0000"})]) + "\n")
    read = read_prompts(path)
    assert read.shared == PROMPTS[:1] and read.own == {"adapter-0001": PROMPTS[1:2], "far-0000": PROMPTS[2:3]}
    assert read.for_adapter("far-0000") == [PROMPTS[0], PROMPTS[2]]
    code = cli(["-q", "verify", str(setup["store"]), "--model", str(setup["model"]), "--prompts", str(path),
                "--max-tokens", "8", "--json"])
    tokens = {r["name"]: r["tokens"] for x in capsys.readouterr().out.splitlines() if (r := json.loads(x))}
    assert code == 0 and tokens == {"adapter-0000": 8, "adapter-0001": 16, "adapter-0002": 8, "far-0000": 16}
    for bad in ({"prompt": "x", "adapters": []}, {"prompt": "x", "adapters": [3]}, {"prompt": "x", "adapter": ""}):
        path.write_text(json.dumps(bad) + "\n")
        with pytest.raises(ValueError, match="must be a non-empty list"):
            read_prompts(path)
    path.write_text(json.dumps({"prompt": "x", "adapter": "a", "adapters": ["b"]}) + "\n")
    with pytest.raises(ValueError, match="not both"):
        read_prompts(path)
    path.write_text(json.dumps({"prompt": "x", "adapters": ["a", "a", "b"]}) + "\n")
    assert read_prompts(path).own == {"a": ["x"], "b": ["x"]}  # a name given twice is measured once


def test_compress_verify_model_stores_exactly_what_fails(setup, tmp_path, capsys):
    """compress --verify-model: the store is fitted as usual, then every adapter below --threshold
    is stored exactly, and only then published at --out; bad gate options, a model that does not
    fit, prompts naming unknown adapters or an existing --out leave nothing at --out."""
    src = tmp_path / "src"
    for d in ("ad", "far"):
        shutil.copytree(setup["root"] / d, src / d)
    out = tmp_path / "gated"
    base = ["-q", "compress", str(src / "ad"), str(src / "far"), "--out", str(out), "--rank", "2", "--clusters", "1"]
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text(json.dumps({"prompt": "x", "adapters": ["nope"]}) + "\n")
    other = make_tiny_llama(tmp_path / "other", hidden=128, dtype=torch.float32)
    gate = ["--verify-model", str(setup["model"])]
    for extra, says in [(["--verify-prompts", str(setup["prompts"])], "applies to --verify-model"),
                        (["--threshold", "0.5"], "--threshold applies to --verify-model"),
                        (gate + ["--verify-prompts", str(tmp_path / "no.jsonl")], "--verify-prompts"),
                        (gate + ["--threshold", "0"], "expected a fraction"),
                        (gate + ["--verify-prompts", str(unknown)], "the prompts name adapters not in"),
                        (["--verify-model", str(other)], "built for another model"),
                        (["--verify-model", str(tmp_path / "nothere")], "no such folder")]:
        capsys.readouterr()
        assert cli(base + extra) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1 and not out.exists(), (extra, err)
        assert not list(tmp_path.glob(".gated.*")), extra  # the staged store is gone too
    code = cli(base + gate + ["--verify-prompts", str(setup["prompts"]), "--verify-max-tokens", "8"])
    printed = capsys.readouterr().out
    m = read_manifest(out)
    exact = sorted(n for n, a in m.adapters.items() if m.clusters[a.cluster].kind == "exact")
    assert code == 0 and "far-0000" in exact and f"repaired {len(exact)} adapters" in printed, printed
    from vllm_jd.store.compact import compact

    assert not compact(out, progress=False)["changed"]  # the repaired adapters' shared Σ rows were dropped before publishing
    assert cli(["-q", "verify", str(out), "--model", str(setup["model"]), "--prompts", str(setup["prompts"]),
                "--max-tokens", "8"]) == 0
    before = tree_digest(out)
    assert cli(base + gate) == 2 and "choose a new --out" in capsys.readouterr().err
    assert tree_digest(out) == before


def test_an_interrupted_gate_leaves_nothing(tmp_path):
    """An interrupt (or any failure) inside the gate removes the staged store; --out stays absent."""
    from vllm_jd.quality.gate import gated

    out = tmp_path / "s"
    with pytest.raises(KeyboardInterrupt), gated(out) as folder:
        folder.mkdir()
        (folder / "manifest.json").write_text("{}")
        raise KeyboardInterrupt
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with gated(out) as folder:
        folder.mkdir()
        (folder / "x").write_text("1")
    assert (out / "x").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_a_killed_gates_staged_folder_is_removed_by_the_next_gate_and_a_live_one_kept(tmp_path):
    """SIGKILL leaves ``.<out>.gate-<id>`` and its free lock file; the next gated run to the same
    --out removes them, but not a folder whose run still holds its lock (a concurrent run)."""
    import fcntl

    from vllm_jd.quality.gate import gated

    out = tmp_path / "s"
    for run in ("dead", "live"):
        (tmp_path / f".s.gate-{run}").mkdir()
        (tmp_path / f".s.gate-{run}" / "manifest.json").write_text("{}")
        (tmp_path / f".s.gate-{run}.lock").write_text("")
    with open(tmp_path / ".s.gate-live.lock") as live:
        fcntl.flock(live, fcntl.LOCK_EX)
        with gated(out) as folder:
            folder.mkdir()
            (folder / "x").write_text("1")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".s.gate-live", ".s.gate-live.lock", "s"]
