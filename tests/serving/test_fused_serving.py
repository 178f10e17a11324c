"""The fused CPU kernel inside a served bf16 model (single-process engine): every shared-basis
layer runs it, and its prompt log-probabilities match the torch-ops path of the same engine. Run
with this CPU's own variant and, where that is AMX, again with the vector variant a machine
without AMX takes (``VLLM_JD_CPU_ISA``): the rank-8 store (as exact rank-8 singletons) is served
zero-padded to 16, the rank every variant takes (on AMX: the expand's half tiles).

A random tiny bf16 Llama is near-uniform (log-probs ≈ −7.6) with large activations, so single
positions move by up to ~0.6 between two bf16 roundings (either path against a float32 merged
reference, too); the test compares medians and the share of close positions, against the
adapters' own effect."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import PROMPTS

from vllm_jd.cli import main as cli
from vllm_jd.compress.synthetic import make_adapters
from vllm_jd.kernels import jd_fused_cpu, torch_ops
from vllm_jd.tiny_model import llama_lora_modules, make_tiny_llama

pytestmark = pytest.mark.skipif(jd_fused_cpu._lib() is None, reason="no AVX2/AVX-512 or no C compiler: no kernel")
OWN = jd_fused_cpu.kernel_isa()
VECTOR = next((isa for isa in jd_fused_cpu.ISAS[1:] if jd_fused_cpu.runs_here(isa)), None)


@pytest.fixture(scope="module", params=[OWN] + ([VECTOR] if VECTOR not in (OWN, None) else []))
def bf16_engine(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("fused")
    model = make_tiny_llama(root / "model", dtype=torch.bfloat16)
    make_adapters(root / "adapters", 8, llama_lora_modules(), rank=8, structure="shared", seed=1, alpha=16)
    assert cli(["-q", "compress", str(root / "adapters"), "--out", str(root / "store"), "--rank", "8",
                "--clusters", "2"]) == 0  # served zero-padded to 16, the kernel's rank multiple
    saved = {k: os.environ.get(k) for k in ("VLLM_JD_STORE", "VLLM_ENABLE_V1_MULTIPROCESSING", "HF_HUB_OFFLINE",
                                            "VLLM_JD_CPU_ISA")}
    os.environ.update(VLLM_JD_STORE=str(root / "store"), VLLM_ENABLE_V1_MULTIPROCESSING="0", HF_HUB_OFFLINE="1",
                      VLLM_JD_CPU_ISA=request.param)
    jd_fused_cpu._lib.cache_clear()  # read the variable again
    from vllm import LLM

    from vllm_jd.serving import op
    from vllm_jd.serving.patch import install

    install()
    before = len(op._LAYERS)  # the op's registry is per process: other engines' layers come first
    engine = LLM(model=str(model), dtype="bfloat16", enable_lora=True, max_lora_rank=16, max_loras=8,
                 max_model_len=128, max_num_seqs=16, kv_cache_memory_bytes=32 * 2**20, enforce_eager=True)
    yield engine, root / "store", len(op._LAYERS) - before, request.param
    del engine
    torch_ops.DEFAULT_PATH = "auto"
    jd_fused_cpu._lib.cache_clear()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    jd_fused_cpu._lib.cache_clear()


def _prompt_logprobs(engine, store, path, adapters, prompts):
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    torch_ops.DEFAULT_PATH = path
    reqs = [LoRARequest(a, i + 1, str(store)) if a else None for i, a in enumerate(adapters) for _ in prompts]
    outs = engine.generate(prompts * len(adapters), SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0),
                           lora_request=reqs, use_tqdm=False)
    return [torch.tensor([next(iter(d.values())).logprob for d in o.prompt_logprobs[1:]]) for o in outs]


def test_served_model_runs_the_kernel_and_matches_the_torch_path(bf16_engine, monkeypatch):
    from vllm_jd.store.format import read_manifest

    engine, store, num_layers, isa = bf16_engine
    adapters = list(read_manifest(store).adapters)[:3] + [None]
    prompts = PROMPTS[:4]
    calls = []
    kernel = jd_fused_cpu.jd_fused_cpu
    monkeypatch.setattr(jd_fused_cpu, "jd_fused_cpu", lambda *a: calls.append((id(a[2]), a[2].isa)) or kernel(*a))
    manager = engine.llm_engine.model_executor.driver_worker.worker.model_runner.lora_manager._adapter_manager
    assert read_manifest(store).rank == 8 and manager.jd_rank == 16  # jd_fused_cpu.served_rank: multiples of 16
    ops = _prompt_logprobs(engine, store, "ops", adapters, prompts)
    assert not calls
    fused = _prompt_logprobs(engine, store, "fused", adapters, prompts)
    assert len(set(calls)) == num_layers == 8  # every shared-basis layer ran it (2 decoder layers × 4)
    assert {variant for _, variant in calls} == {isa}

    n = len(prompts)
    base = fused[-n:]
    assert all(torch.equal(f, o) for f, o in zip(fused[-n:], ops[-n:], strict=True))  # no adapter: the same base output
    diff = torch.cat([(f - o).abs() for f, o in zip(fused[:-n], ops[:-n], strict=True)])
    effect = torch.cat([(f - b).abs() for f, b in zip(fused[:-n], base * (len(adapters) - 1), strict=True)])
    assert diff.median() < 0.05 and (diff < 0.1).float().mean() > 0.9, diff
    assert effect.median() > 5 * diff.median(), (effect.median(), diff.median())  # the adapters do act
