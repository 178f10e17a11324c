"""The trained adapter zoo: task generators, the byte-level tokenizer, a micro zoo end to end
(loadable base model and PEFT adapters, held-out files, determinism, falling loss), and the
quality benchmark's refusals before any engine starts. No vLLM engine is started here."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from vllm_jd.zoo.build import make_zoo, micro_config, read_tasks, widened
from vllm_jd.zoo.data import encode_examples, make_char_tokenizer
from vllm_jd.zoo.tasks import TASKS, exact_match, examples, select_tasks

ROOT = Path(__file__).resolve().parents[2]


def _input(prompt: str) -> str:
    return prompt.split(": ", 1)[1].removesuffix(" =")


def test_tasks_are_deterministic_distinct_and_disjoint():
    for task in TASKS.values():
        a = examples(task, 30, seed=3)
        assert a == examples(task, 30, seed=3)
        assert a != examples(task, 30, seed=4)
        assert len({p for p, _ in a}) == 30 and all(p.startswith(f"{task.name}: ") and p.endswith(" =") for p, _ in a)
        held = {p for p, _ in a}
        assert not held & {p for p, _ in examples(task, 200, seed=5, exclude=held)}
    with pytest.raises(ValueError):
        select_tasks(len(TASKS) + 1)
    assert [t.name for t in select_tasks(3)] == ["rev", "upper", "sort"]


def test_task_answers_are_correct():
    for p, a in examples(TASKS["rev"], 50, seed=0):
        assert a == _input(p)[::-1]
    for p, a in examples(TASKS["sort"], 50, seed=0):
        assert a == "".join(sorted(_input(p)))
    for p, a in examples(TASKS["add"], 50, seed=0):
        x, y = _input(p).split("+")
        assert int(a) == int(x) + int(y)
    for p, a in examples(TASKS["sub"], 50, seed=0):
        x, y = _input(p).split("-")
        assert int(a) == int(x) - int(y) >= 0
    cases = {"upper": ("abc", "ABC"), "rot": ("abz", "bca"), "vow": ("banana", "b*n*n*"), "len": ("abcd", "4"),
             "dup": ("ab", "aabb"), "cnt": ("a banana", "3"), "swap": ("abcde", "badce"), "uniq": ("abcab", "abc")}
    for name, (x, y) in cases.items():
        assert TASKS[name].solve(x) == y, name
    assert exact_match(" cba\nrest", "cba") and not exact_match(" cb", "cba")


def test_tokenizer_is_one_token_per_byte_and_loads_with_autotokenizer(tmp_path):
    from transformers import AutoTokenizer

    make_char_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    for p, a in examples(TASKS["rev"], 5, seed=0):
        (pi, ai), = encode_examples(tok, [(p, a)])
        assert pi + ai == tok(p + f" {a}\n", add_special_tokens=False).input_ids
        assert len(pi) == len(p.encode()) and tok.decode(pi + ai) == f"{p} {a}\n"
    assert tok("rev: ab =").input_ids == tok("rev: ab =", add_special_tokens=False).input_ids  # no BOS


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """At the micro size a second thread only adds overhead (and the machine may be shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def micro_zoo(one_thread, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zoo") / "zoo"
    make_zoo(out, micro_config(tasks=2, seed=1))
    return out


def test_micro_zoo_writes_a_loadable_model_adapters_and_tasks(micro_zoo):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from vllm_jd.compress.peft_io import discover, open_adapter

    zoo = json.loads((micro_zoo / "zoo.json").read_text())
    assert sorted(zoo["adapters"]) == ["rev-0", "upper-0"] and list(zoo["tasks"]) == ["rev", "upper"]
    assert list((micro_zoo / "model").glob("*.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(str(micro_zoo / "model"))
    assert isinstance(model, LlamaForCausalLM) and model.config.head_dim in (32, 64)
    AutoTokenizer.from_pretrained(str(micro_zoo / "model"))
    found = dict(discover([micro_zoo / "adapters"]))
    assert sorted(found) == ["rev-0", "upper-0"]
    adapter = open_adapter("rev-0", found["rev-0"])
    assert len(adapter.modules) == 7 and {s.rank for s in adapter.modules.values()} == {4}
    peft = PeftModel.from_pretrained(model, str(found["rev-0"]))
    ids = torch.tensor([[10, 11, 12]])
    assert not torch.equal(peft(ids).logits, AutoModelForCausalLM.from_pretrained(str(micro_zoo / "model"))(ids).logits)
    tasks = read_tasks(micro_zoo)
    assert sorted(tasks) == ["rev", "upper"] and all(len(v) == 20 for v in tasks.values())
    train = {p for p, _ in examples(TASKS["rev"], 200, seed=100)}
    assert not train & {p for p, _ in tasks["rev"]}  # the adapter's training prompts (seed·100 + 1 = 101 …)


def test_micro_zoo_training_reduces_loss_and_is_deterministic(micro_zoo, tmp_path):
    from safetensors.torch import load_file

    zoo = json.loads((micro_zoo / "zoo.json").read_text())
    assert zoo["base_loss_last"] < zoo["base_loss_first"]
    for a in zoo["adapters"].values():
        assert a["loss_last"] < a["loss_first"]
    again = tmp_path / "again"
    make_zoo(again, micro_config(tasks=2, seed=1))
    for name in ("rev-0", "upper-0"):
        x = load_file(str(micro_zoo / "adapters" / name / "adapter_model.safetensors"))
        y = load_file(str(again / "adapters" / name / "adapter_model.safetensors"))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert (micro_zoo / "tasks" / "rev.jsonl").read_text() == (again / "tasks" / "rev.jsonl").read_text()
    with pytest.raises(ValueError, match="not empty"):
        make_zoo(again, micro_config(tasks=2, seed=1))


def _quality():
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quality_bench_refuses_impossible_settings_before_any_engine(micro_zoo, tmp_path, capsys):
    quality = _quality()
    out = ["--out", str(tmp_path / "q")]
    assert quality.main(["--zoo", str(micro_zoo), "--ranks", "65", "--methods", "jd-full", *out]) == 2
    assert "rank 65 is impossible" in capsys.readouterr().err  # micro zoo: k_proj maps 64→64
    assert quality.main(["--zoo", str(micro_zoo), "--clusters", "3", "--ranks", "4", *out]) == 2
    assert "3 clusters is impossible with 2 adapters" in capsys.readouterr().err
    (tmp_path / "empty" / "adapters").mkdir(parents=True)
    (tmp_path / "empty" / "model").mkdir()
    (tmp_path / "empty" / "model" / "config.json").write_text("{}")
    assert quality.main(["--zoo", str(tmp_path / "empty"), *out]) == 2
    assert "no *.safetensors weights" in capsys.readouterr().err
    (tmp_path / "empty" / "model" / "model.safetensors").write_bytes(b"")
    assert quality.main(["--zoo", str(tmp_path / "empty"), *out]) == 2
    err = capsys.readouterr().err
    assert "no adapters" in err and "adapters" in err, err
    assert not (tmp_path / "q" / "quality.jsonl").exists()


def test_a_varied_zoo_mixes_ranks_and_targets(tmp_path):
    from vllm_jd.zoo.build import varied
    from vllm_jd.zoo.train import ATTENTION_TARGETS, LoraConfig

    base = LoraConfig()
    got = [varied(base, j) for j in range(6)]
    assert [c.rank for c in got] == [4, 8, 16, 4, 8, 16] and all(c.alpha == 2 * c.rank for c in got)
    assert [c.targets == ATTENTION_TARGETS for c in got] == [False, True] * 3
    cfg = micro_config(tasks=1, seed=2)
    cfg.adapters_per_task, cfg.vary = 2, True
    zoo = make_zoo(tmp_path / "zoo", cfg)
    configs = [json.loads((tmp_path / "zoo" / "adapters" / n / "adapter_config.json").read_text())
               for n in zoo["adapters"]]
    assert [c["r"] for c in configs] == [4, 8]
    assert sorted(configs[1]["target_modules"]) == sorted(ATTENTION_TARGETS)
    assert len(configs[0]["target_modules"]) == 7 and zoo["config"]["vary"] is True


def test_widened_model_keeps_64_wide_heads():
    from vllm_jd.zoo.train import ModelConfig

    m = widened(ModelConfig(), 512)
    assert (m.hidden, m.heads, m.kv_heads, m.intermediate, m.layers) == (512, 8, 4, 1024, ModelConfig().layers)
    assert widened(ModelConfig(), 64).kv_heads == 1
    with pytest.raises(ValueError, match="multiple of 64"):
        widened(ModelConfig(), 100)


def test_a_resumed_zoo_is_the_zoo_an_uninterrupted_run_writes(one_thread, micro_zoo, tmp_path):
    """An interrupted run (here: its last adapter and zoo.json gone) resumed with --resume keeps
    the saved base and adapters and trains the rest to the same weights."""
    import shutil

    from safetensors.torch import load_file

    out = tmp_path / "z"
    shutil.copytree(micro_zoo, out)
    last = sorted((out / "adapters").iterdir())[-1]
    kept = sorted((out / "adapters").iterdir())[0]
    kept_mtime = (kept / "adapter_model.safetensors").stat().st_mtime_ns
    shutil.rmtree(last)
    (out / "zoo.json").unlink()
    with pytest.raises(ValueError, match="--resume continues"):
        make_zoo(out, micro_config(tasks=2, seed=1))
    with pytest.raises(ValueError, match="another config"):
        make_zoo(out, micro_config(tasks=2, seed=2), resume=True)
    zoo = make_zoo(out, micro_config(tasks=2, seed=1), resume=True)
    assert (kept / "adapter_model.safetensors").stat().st_mtime_ns == kept_mtime  # not trained again
    again = load_file(str(last / "adapter_model.safetensors"))
    first = load_file(str(micro_zoo / "adapters" / last.name / "adapter_model.safetensors"))
    assert again.keys() == first.keys() and all(torch.allclose(again[k], first[k], atol=1e-6) for k in first)
    assert zoo["adapters"] == json.loads((micro_zoo / "zoo.json").read_text())["adapters"]
