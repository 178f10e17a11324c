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
