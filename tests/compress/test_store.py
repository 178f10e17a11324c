"""compress → store → export / add / inspect, through the CLI entry point."""

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import TINY_MODULES, dense_update

from vllm_jd.cli import main
from vllm_jd.compress.synthetic import factors, make_adapters, write_adapter
from vllm_jd.store.format import TensorReader, read_manifest


def run(*args) -> int:
    return main(["-q", *map(str, args)])


@pytest.fixture(scope="module")
def planted_store(planted_adapters, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stores") / "planted"
    assert run("compress", planted_adapters, "--out", out, "--rank", 4, "--clusters", 3) == 0
    return out


def test_manifest_contents(planted_store, planted_adapters):
    m = read_manifest(planted_store)
    assert m.format_version == 2 and m.method == "jd-full" and m.rank == 4 and len(m.clusters) == 3
    assert sorted(x.name for x in m.modules) == sorted(TINY_MODULES)
    assert sorted(m.adapters) == sorted(p.name for p in planted_adapters.iterdir())
    a = m.adapters["adapter-0005"]
    assert a.checksum.startswith("sha256:") and len(a.module_errors) == len(TINY_MODULES)
    assert a.lora_params == sum(4 * (d_in + d_out) for d_in, d_out in TINY_MODULES.values())
    assert max(x.error for x in m.adapters.values()) < 1e-4  # planted groups at their own rank: lossless
    assert all(key in m.weight_map for key in ("U.0.model.layers.0.self_attn.q_proj", "sigma.2.0.model.layers.2.self_attn.v_proj"))


@pytest.mark.parametrize("method", ["jd-full", "jd-diag", "svd"])
def test_lossless_export_at_full_rank(method, tmp_path):
    """Proposition 1 through `export`: at r ≥ r̃ the exported PEFT adapter equals the original."""
    src = tmp_path / "src"
    paths = make_adapters(src, 3, TINY_MODULES, rank=4, structure="random", seed=5, alpha=16)
    # give one adapter rsLoRA scaling and another a different rank, to check the scale folding
    cfg = json.loads((paths[0] / "adapter_config.json").read_text())
    (paths[0] / "adapter_config.json").write_text(json.dumps({**cfg, "use_rslora": True}))
    _, mods = next(iter(factors(TINY_MODULES, 1, 2, "random", 9)))
    write_adapter(src / "adapter-rank2", mods, 2, alpha=3.0)
    # ranks 4, 4, 4, 2 in 2 non-empty clusters: each cluster's r̃ ≤ 4+4+4 = 12, so rank 12 is lossless
    rank = 12 if method != "svd" else 4
    extra = ["--clusters", 2] if method != "svd" else []
    store = tmp_path / "store"
    assert run("compress", src, "--out", store, "--method", method, "--rank", rank, *extra, "--iters", 20) == 0
    for p in sorted(src.iterdir()):
        out = tmp_path / f"exp-{p.name}"
        assert run("export", store, p.name, "--out", out) == 0
        for module in TINY_MODULES:
            want, got = dense_update(p, module), dense_update(out, module)
            assert torch.allclose(got, want, atol=1e-5 * float(want.abs().max())), (p.name, module)


def test_reported_errors_match_exported_adapters(shared_adapters, tmp_path):
    store = tmp_path / "s"
    assert run("compress", shared_adapters, "--out", store, "--rank", 3, "--clusters", 2) == 0
    m = read_manifest(store)
    for name in ("adapter-0000", "adapter-0007"):
        assert run("export", store, name, "--out", tmp_path / name) == 0
        for module, mi in m.module_index().items():
            want, got = dense_update(shared_adapters / name, module), dense_update(tmp_path / name, module)
            err = float((got - want).norm() / want.norm())
            assert err == pytest.approx(m.adapters[name].module_errors[mi], abs=1e-4)
            assert 0.01 < err < 1


def test_peft_loads_exported_adapter(planted_store, tmp_path):
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    assert run("export", planted_store, "adapter-0004", "--out", tmp_path / "e") == 0
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    model = PeftModel.from_pretrained(LlamaForCausalLM(cfg), str(tmp_path / "e"))
    layer = model.base_model.model.model.layers[1].self_attn.k_proj
    delta = layer.get_delta_weight("default").double()
    want = dense_update(tmp_path / "e", "model.layers.1.self_attn.k_proj")
    assert torch.allclose(delta, want, atol=1e-6)
    reader = TensorReader(planted_store, read_manifest(planted_store))
    m = reader.manifest.adapters["adapter-0004"]
    U = reader.get(f"U.{m.cluster}.model.layers.1.self_attn.k_proj").double()
    V = reader.get(f"V.{m.cluster}.model.layers.1.self_attn.k_proj").double()
    assert torch.allclose(delta, U @ reader.sigma("adapter-0004", "model.layers.1.self_attn.k_proj").double() @ V.T,
                          atol=1e-6)


def test_add_existing_adapter_returns_its_sigma(planted_store, planted_adapters, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(planted_store, store)
    twin = tmp_path / "twin-of-0007"
    shutil.copytree(planted_adapters / "adapter-0007", twin)
    assert run("add", store, twin) == 0
    m = read_manifest(store)
    reader = TensorReader(store, m)
    assert m.adapters[twin.name].cluster == m.adapters["adapter-0007"].cluster
    for module in TINY_MODULES:
        assert torch.allclose(reader.sigma(twin.name, module), reader.sigma("adapter-0007", module), atol=1e-5)
    assert m.clusters[m.adapters[twin.name].cluster].kind == "shared" and len(m.clusters) == 3


def test_add_far_adapter_becomes_exact_singleton(planted_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(planted_store, store)
    before = {k: v for k, v in read_manifest(store).weight_map.items()}
    far = make_adapters(tmp_path / "far", 1, TINY_MODULES, rank=6, structure="random", seed=99, prefix="far")[0]
    assert run("add", store, far, "--max-error", 0.5) == 0
    m = read_manifest(store)
    info = m.adapters["far-0000"]
    assert m.clusters[info.cluster].kind == "exact" and m.clusters[info.cluster].rank == 6
    assert info.error < 1e-5
    assert all(m.weight_map[k] == v for k, v in before.items())  # existing bases untouched
    assert run("export", store, "far-0000", "--out", tmp_path / "x") == 0
    for module in TINY_MODULES:
        want = dense_update(far, module)
        assert torch.allclose(dense_update(tmp_path / "x", module), want, atol=1e-5 * float(want.abs().max()))


def test_inspect_json(planted_store, capsys):
    assert run("inspect", planted_store, "--json") == 0
    s = json.loads(capsys.readouterr().out)
    assert s["adapters"] == 24 and s["clusters"] == 3 and s["rank"] == 4
    assert s["error"]["max"] < 1e-4 and s["params_saved"]["total"] < s["params_saved"]["per_adapter"] < 1
    d = sum(a + b for a, b in TINY_MODULES.values())
    assert s["bytes_per_basis"]["mean"] == 4 * 4 * d
    assert s["bytes_per_adapter"]["sigma"] == 4 * 16 * len(TINY_MODULES)
    assert run("inspect", planted_store) == 0
    assert "params saved per adapter" in capsys.readouterr().out


def test_console_script_and_progress(planted_adapters, tmp_path):
    exe = Path(sys.executable).parent / "vllm-jd"
    proc = subprocess.run([str(exe), "compress", str(planted_adapters), "--out", str(tmp_path / "s"), "--rank", "4",
                           "--clusters", "3"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "compress:" in proc.stderr and "100%" in proc.stderr  # the progress bar
    assert proc.stdout.startswith("compressed 24 adapters × 9 modules")


def test_recompress_replaces_store_atomically(planted_adapters, tmp_path):
    out = tmp_path / "s"
    assert run("compress", planted_adapters, "--out", out, "--rank", 4, "--clusters", 3) == 0
    assert run("compress", planted_adapters, "--out", out, "--rank", 2, "--clusters", 1) == 0
    assert read_manifest(out).rank == 2
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no temporary or old copies left behind


def test_inspect_piped_into_head_is_not_an_error(tmp_path):
    """`vllm-jd inspect STORE | head` (under `set -o pipefail`, as scripts/demo.sh runs it) exits 0 when the
    reader stops early (`| true` stops at once, so the write always meets a closed pipe)."""
    import subprocess
    import sys
    from pathlib import Path

    from vllm_jd.cli import main as cli
    from vllm_jd.compress.synthetic import make_adapters

    make_adapters(tmp_path / "a", 3, TINY_MODULES, rank=4)
    assert cli(["-q", "compress", str(tmp_path / "a"), "--out", str(tmp_path / "s"), "--rank", "4", "--clusters", "1"]) == 0
    exe = Path(sys.executable).parent / "vllm-jd"
    p = subprocess.run(["bash", "-o", "pipefail", "-c", f"'{exe}' inspect '{tmp_path / 's'}' | true"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "error" not in p.stderr


def test_summary_median_warning_above_max_error_and_negative_saving_in_words(tmp_path, capsys):
    """A fixed rank too small for unrelated adapters: the summary's median is inspect's, a warning
    names how many adapters are above --max-error, and inspect says why nothing is saved."""
    far = make_adapters(tmp_path / "a", 3, TINY_MODULES, rank=6, structure="random", seed=5)
    assert run("compress", *far, "--out", tmp_path / "s", "--rank", 2, "--clusters", 3) == 0
    out, err = capsys.readouterr()
    assert run("inspect", tmp_path / "s", "--json") == 0
    s = json.loads(capsys.readouterr().out)
    assert f"error median {s['error']['median']:.4f}" in out
    assert f"warning: 3 of 3 adapters have error above --max-error 0.5 (worst {s['error']['max']:.4f})" in err
    assert "too few adapters share" not in (run("inspect", tmp_path / "s"), capsys.readouterr().out)[1]
    assert run("compress", *far, "--out", tmp_path / "s6", "--rank", 6, "--clusters", 3) == 0  # lossless singletons
    assert "warning" not in capsys.readouterr().err
    assert run("inspect", tmp_path / "s6") == 0
    out = capsys.readouterr().out
    assert "/ total -0.06  (the store holds 1.06× the adapters' LoRA parameters: too few adapters share each" in out


def test_export_at_the_adapters_own_rank_or_a_chosen_cut_and_only_its_modules(tmp_path, caplog):
    """Rank-4 adapters in a lossless rank-16 store export at r = 4 (not 16), exactly; ``--rank 2``
    cuts and says by how much; an adapter of layer 0 only loads in PEFT with no missing keys."""
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    src = tmp_path / "src"
    paths = make_adapters(src, 3, TINY_MODULES, rank=4, structure="random", seed=5)
    layer0 = {m: d for m, d in TINY_MODULES.items() if ".layers.0." in m}
    _, mods = next(iter(factors(layer0, 1, 4, "random", 9)))
    write_adapter(src / "only-layer-0", mods, 4, alpha=8)  # as PEFT writes layers_to_transform=[0]
    assert run("compress", src, "--out", tmp_path / "s", "--rank", 16, "--clusters", 1) == 0  # lossless: 4 × 4
    assert run("export", tmp_path / "s", paths[1].name, "--out", tmp_path / "e4") == 0
    cfg = json.loads((tmp_path / "e4" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["rank_pattern"] == {} and cfg["target_modules"] == sorted(TINY_MODULES)
    for module in TINY_MODULES:
        want = dense_update(paths[1], module)
        assert torch.allclose(dense_update(tmp_path / "e4", module), want, atol=1e-5 * float(want.abs().max()))
    assert run("export", tmp_path / "s", paths[1].name, "--out", tmp_path / "e2", "--rank", 2) == 0
    assert json.loads((tmp_path / "e2" / "adapter_config.json").read_text())["r"] == 2
    assert f"{paths[1].name} cut to rank 2: relative error up to 0." in caplog.text
    assert run("export", tmp_path / "s", paths[1].name, "--out", tmp_path / "e9", "--rank", 100_000) == 0
    assert json.loads((tmp_path / "e9" / "adapter_config.json").read_text())["r"] == 4  # no zero rows written
    assert run("export", tmp_path / "s", paths[1].name, "--out", tmp_path / "e0", "--rank", 0) == 2
    assert not (tmp_path / "e0").exists()
    assert run("export", tmp_path / "s", "only-layer-0", "--out", tmp_path / "l0") == 0
    assert json.loads((tmp_path / "l0" / "adapter_config.json").read_text())["target_modules"] == sorted(layer0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(LlamaForCausalLM(cfg), str(tmp_path / "l0"))
    assert not [w for w in seen if "missing adapter keys" in str(w.message)], [str(w.message) for w in seen]
    assert not hasattr(model.base_model.model.model.layers[1].self_attn.q_proj, "lora_A")  # layer 1 untouched


@pytest.mark.parametrize("adapters, auto_args", [("shared_adapters", ["--max-error", 0.3]),
                                                 ("planted_adapters", ["--rank", 4, "--max-error", 0.05])])
def test_fixed_settings_write_the_store_auto_lands_on(adapters, auto_args, tmp_path, request):
    """The speed work skips the selection pass when rank and clusters are given: a fixed compress at
    the setting auto chose (one cluster, or several) writes the same bases, Σ, assignments and errors."""
    src = request.getfixturevalue(adapters)
    assert run("compress", src, "--out", tmp_path / "auto", *auto_args) == 0
    auto = read_manifest(tmp_path / "auto")
    rank, k = auto.settings["rank_chosen"], auto.settings["clusters_chosen"]
    assert (k == 1) == (adapters == "shared_adapters")
    assert run("compress", src, "--out", tmp_path / "fixed", "--rank", rank, "--clusters", k) == 0
    fixed = read_manifest(tmp_path / "fixed")
    assert {n: (a.cluster, a.row, a.error) for n, a in auto.adapters.items()} == \
           {n: (a.cluster, a.row, a.error) for n, a in fixed.adapters.items()}
    ra, rf = TensorReader(tmp_path / "auto", auto), TensorReader(tmp_path / "fixed", fixed)
    assert sorted(auto.weight_map) == sorted(fixed.weight_map)
    for key in auto.weight_map:
        assert torch.equal(ra.get(key), rf.get(key)), key
