"""Every bad input: non-zero exit, a message naming the adapter and the problem, and the
existing store byte-for-byte unchanged (for both `compress --out STORE` and `add STORE`)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import TINY_MODULES, tree_digest
from safetensors.torch import load_file, save_file

from vllm_jd.cli import main
from vllm_jd.compress.synthetic import make_adapters

Q = "base_model.model.model.layers.0.self_attn.q_proj"


def edit_config(p: Path, **changes):
    cfg = json.loads((p / "adapter_config.json").read_text())
    (p / "adapter_config.json").write_text(json.dumps({**cfg, **changes}))


def edit_tensors(p: Path, fn):
    f = p / "adapter_model.safetensors"
    t = load_file(str(f))
    fn(t)
    save_file(t, str(f))


def nan(p):
    edit_tensors(p, lambda t: t[f"{Q}.lora_A.weight"].__setitem__((0, 0), float("nan")))


def inf(p):
    edit_tensors(p, lambda t: t[f"{Q}.lora_B.weight"].__setitem__((1, 1), float("inf")))


def wrong_rank(p):
    edit_config(p, r=5)


def wrong_shape(p):  # lora_A of q_proj reads a 48-wide input while every other adapter's reads 64
    edit_tensors(p, lambda t: t.__setitem__(f"{Q}.lora_A.weight", torch.randn(4, 48)))


def missing_b(p):
    edit_tensors(p, lambda t: t.pop(f"{Q}.lora_B.weight"))


def embedding(p):
    edit_tensors(p, lambda t: t.__setitem__("base_model.model.model.embed_tokens.lora_embedding_A", torch.randn(4, 10)))


def rank_above_dim(p):
    edit_config(p, r=40)
    edit_tensors(p, lambda t: [t.__setitem__(k, torch.randn(40, v.shape[1]) if "lora_A" in k else torch.randn(v.shape[0], 40))
                               for k, v in list(t.items())])


def huge(value: float):
    def scale(p):  # finite weights whose update s·B·A overflows when served
        edit_tensors(p, lambda t: [t.__setitem__(k, torch.full_like(v, value)) for k, v in list(t.items()) if Q in k])
    return scale


CASES = {
    "missing config": (lambda p: (p / "adapter_config.json").unlink(), "missing adapter_config.json"),
    "missing weights": (lambda p: (p / "adapter_model.safetensors").unlink(), "missing adapter_model.safetensors"),
    "corrupt weights": (lambda p: (p / "adapter_model.safetensors").write_bytes(b"\x00garbage"), "cannot read"),
    "invalid json": (lambda p: (p / "adapter_config.json").write_text("{not json"), "invalid JSON"),
    "nan": (nan, "NaN or Inf"),
    "inf": (inf, "NaN or Inf"),
    "rank mismatch": (wrong_rank, "disagree with rank r=5"),
    "shape vs others": (wrong_shape, "maps 48→64"),
    "missing lora_B": (missing_b, "no lora_B"),
    "dora": (lambda p: edit_config(p, use_dora=True), "DoRA"),
    "bias": (lambda p: edit_config(p, bias="all"), "bias"),
    "embeddings": (embedding, "embedding LoRA"),
    "not lora": (lambda p: edit_config(p, peft_type="IA3"), "unsupported PEFT type 'IA3'"),
    "rank above dim": (rank_above_dim, "larger than the module's dimension"),
    "huge 1e19": (huge(1e19), "would overflow when served"),  # once: error NaN → an unreadable manifest
    "huge 1e17": (huge(1e17), "would overflow when served"),  # once: accepted with error 0, NaN when served
    "huge 300": (huge(300.0), "would overflow when served"),  # every entry of P is s·r·300² ≫ 65504
}


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("good")
    make_adapters(root, 6, TINY_MODULES, rank=4, structure="shared", seed=3)
    return root


@pytest.fixture
def store(good, tmp_path) -> Path:
    out = tmp_path / "store"
    assert main(["-q", "compress", str(good), "--out", str(out), "--rank", "4", "--clusters", "2"]) == 0
    return out


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("command", ["compress", "add"])
def test_bad_adapter(case, command, good, store, tmp_path, capsys):
    breaker, message = CASES[case]
    src = tmp_path / "src"
    shutil.copytree(good, src)
    bad = src / "adapter-0003"
    bad.rename(src / "broken")
    bad = src / "broken"
    breaker(bad)
    digest = tree_digest(store)
    capsys.readouterr()
    if command == "compress":
        rc = main(["-q", "compress", str(src), "--out", str(store), "--rank", "4"])
    else:
        rc = main(["-q", "add", str(store), str(bad)])
    err = capsys.readouterr().err
    assert rc != 0
    assert "broken" in err and message in err, err
    assert tree_digest(store) == digest
    assert sorted(p.name for p in store.parent.iterdir()) == ["src", "store"]  # no temporary leftovers


def run_and_check(args, store, message, capsys):
    digest = tree_digest(store)
    capsys.readouterr()
    assert main(["-q", *map(str, args)]) != 0
    err = capsys.readouterr().err
    assert message in err, err
    assert tree_digest(store) == digest


def test_rank_above_module_dimension(good, store, capsys):
    run_and_check(["compress", good, "--out", store, "--rank", 33], store,
                  "rank 33 is larger than module model.layers.0.self_attn.k_proj (64→32); use --rank 32 or less (at 32 "
                  "that module is stored exactly), or --rank auto", capsys)


def test_duplicate_names(good, store, tmp_path, capsys):
    shutil.copytree(good / "adapter-0001", tmp_path / "other" / "adapter-0001")
    run_and_check(["compress", good, tmp_path / "other", "--out", store], store, "adapter 'adapter-0001'", capsys)
    run_and_check(["add", store, good / "adapter-0002"], store, "already in the store", capsys)


def test_empty_adapter_list(store, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    run_and_check(["compress", tmp_path / "empty", "--out", store], store, "no adapter_config.json", capsys)


def test_missing_path(store, tmp_path, capsys):
    run_and_check(["compress", tmp_path / "nope", "--out", store], store, "'nope'", capsys)
    run_and_check(["add", store, tmp_path / "nope"], store, "path does not exist", capsys)


def test_module_not_in_store(store, tmp_path, capsys):
    odd = make_adapters(tmp_path / "odd", 1, {"model.layers.0.mlp.up_proj": (64, 128)}, rank=4, prefix="odd")[0]
    run_and_check(["add", store, odd], store, "module 'model.layers.0.mlp.up_proj' is not in the store", capsys)


def test_refuses_to_overwrite_non_store(good, tmp_path, capsys):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    assert main(["-q", "compress", str(good), "--out", str(target), "--rank", "4"]) != 0
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (target / "notes.txt").read_text() == "mine"


def test_bad_settings(good, store, capsys):
    run_and_check(["compress", good, "--out", store, "--clusters", 7], store, "clusters 7 is more than the 6 adapters", capsys)
    run_and_check(["compress", good, "--out", store, "--method", "svd", "--clusters", 2], store, "does not apply", capsys)
    run_and_check(["compress", good, "--out", store, "--max-error", -1], store, "max_error", capsys)
    run_and_check(["export", store, "nobody", "--out", store.parent / "x"], store, "no adapter named 'nobody'", capsys)
    run_and_check(["inspect", store.parent / "nostore"], store, "not a vllm-jd store", capsys)
