"""``vllm-jd serve`` refuses, before any engine starts, a model vLLM serves no LoRA on and a store
made for another model: one line, exit 2, in seconds (an engine start takes 10-60 s)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from vllm_jd.serving import preflight


def serve(model, store) -> tuple[subprocess.CompletedProcess, float]:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "vllm_jd.cli", "serve", str(model), "--jd-store", str(store)],
                          capture_output=True, text=True, timeout=300)
    return proc, time.perf_counter() - t


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    from transformers import GPT2Config

    out = tmp_path_factory.mktemp("gpt2")
    GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=128, architectures=["GPT2LMHeadModel"]).save_pretrained(out)
    return out


def test_a_model_without_lora_support_is_refused_at_once(gpt2, serving_store):
    proc, seconds = serve(gpt2, serving_store)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("vllm-jd serve: error: vLLM serves no LoRA on GPT2LMHeadModel")
    assert "Traceback" not in proc.stderr
    assert seconds < 30, seconds  # about 6 s here; the engine would have started first before


def test_a_store_of_another_model_is_refused_at_once(tiny_model, serving_store):
    from vllm_jd.store.format import read_manifest

    preflight.check(str(tiny_model), {m.name: (m.d_in, m.d_out) for m in read_manifest(serving_store).modules})
    store = {"model.layers.0.self_attn.q_proj": (256, 128), "model.layers.9.self_attn.q_proj": (256, 256)}
    with pytest.raises(ValueError, match="store modules are not in the model, e.g. model.layers.9.self_attn.q_proj"):
        preflight.check(str(tiny_model), store)
    with pytest.raises(ValueError, match=r"other shapes, e\.g\. model.layers.0.self_attn.q_proj 256→128 \(model: 256→256"):
        preflight.check(str(tiny_model), {"model.layers.0.self_attn.q_proj": (256, 128)})


def test_unreadable_models_are_left_to_vllm(tmp_path):
    preflight.check("some-org/not-in-the-cache", {"x": (1, 1)})  # no config here: nothing refused
    preflight.check(str(tmp_path), {"x": (1, 1)})


@pytest.mark.parametrize("env, message", [
    ({"VLLM_JD_CPU_ISA": "avx9"}, "VLLM_JD_CPU_ISA='avx9': expected one of auto, amx, avx512bf16, avx512, avx2, none"),
    ({"VLLM_JD_CPU_FUSED": "yes"}, "VLLM_JD_CPU_FUSED='yes': expected 0 or 1"),
    ({"VLLM_JD_CPU_AMX": "2"}, "VLLM_JD_CPU_AMX='2': expected 0 or 1"),
])
def test_bad_cpu_kernel_settings_are_refused_before_any_engine(tiny_model, serving_store, env, message, monkeypatch):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    proc, seconds = serve(tiny_model, serving_store)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == f"vllm-jd serve: error: {message}"
    assert "Traceback" not in proc.stderr and seconds < 30


def test_a_named_cpu_isa_this_cpu_lacks_is_refused(monkeypatch):
    from vllm_jd.kernels import jd_fused_cpu
    from vllm_jd.serving.serve import check_cpu_kernel_settings

    monkeypatch.setenv("VLLM_JD_CPU_ISA", "amx")
    monkeypatch.setattr(jd_fused_cpu, "cpu_flags", lambda: {"avx2", "fma"})  # a Zen 3
    with pytest.raises(ValueError, match="VLLM_JD_CPU_ISA=amx: this CPU lacks"):
        check_cpu_kernel_settings()
    monkeypatch.setenv("VLLM_JD_CPU_FUSED", "0")  # no kernel at all: nothing to refuse
    check_cpu_kernel_settings()
