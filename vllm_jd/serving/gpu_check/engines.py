"""Engine runs for ``gpu-check``, each in its own process (our patches are process-wide, and a
stock engine must not see them): greedy tokens for parity, or requests/s for throughput.

``run(spec)`` starts ``python -m vllm_jd.serving.gpu_check.engines SPEC_JSON`` and returns the
child's result dict; the child builds one offline ``vllm.LLM`` as ``spec`` says:
mode "jd" (the store, our plugin), "stock" (vLLM's LoRA on adapter folders) or "base" (no LoRA).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np

RESULT = "GPU_CHECK_RESULT "


def run(spec: dict, timeout: float = 900) -> dict:
    """Run one engine job in a child process; its result, or {"error": ...} with the log's tail."""
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1"}
    if spec["mode"] == "jd":
        env["VLLM_JD_STORE"] = spec["store"]
    proc = subprocess.run([sys.executable, "-m", "vllm_jd.serving.gpu_check.engines", json.dumps(spec)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT):])
    return {"error": f"engine ({spec['mode']}) exited {proc.returncode}: {(proc.stdout + proc.stderr)[-1500:]}"}


def prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """``n`` prompts of ``length`` random token ids (below 3: special tokens)."""
    rng = np.random.default_rng(seed)
    return rng.integers(3, vocab, (n, length)).tolist()


def _engine(spec: dict):
    from vllm import LLM

    kwargs = dict(model=spec["model"], dtype=spec["dtype"], max_model_len=spec.get("max_model_len", 512),
                  max_num_seqs=spec.get("max_num_seqs", 64), enforce_eager=spec.get("eager", False), seed=0)
    kwargs.update(spec.get("engine", {}))
    if spec["mode"] != "base":
        kwargs.update(enable_lora=True, max_lora_rank=spec["max_lora_rank"], max_loras=spec["max_loras"],
                      max_cpu_loras=max(spec["max_loras"], len(spec["adapters"])))
    if spec["mode"] == "jd":
        from vllm_jd.serving.patch import install

        install()
    return LLM(**kwargs)


def _requests(spec: dict, names: list[str | None]):
    from vllm.lora.request import LoRARequest

    paths = spec["adapters"]
    ids = {n: i + 1 for i, n in enumerate(paths)}
    where = lambda n: spec["store"] if spec["mode"] == "jd" else paths[n]  # noqa: E731
    return [LoRARequest(n, ids[n], where(n)) if n else None for n in names]


def child(spec: dict) -> dict:
    """The job: ``task`` "tokens" (greedy tokens of every (prompt, adapter) pair) or
    "throughput" (requests/s of each of ``workloads``)."""
    from vllm import SamplingParams, TokensPrompt

    llm = _engine(spec)
    names = list(spec["adapters"]) or [None]
    params = SamplingParams(temperature=0, max_tokens=spec["max_tokens"], ignore_eos=True)
    if spec["task"] == "tokens":
        # base requests in a batch of their own too: an adapter that changes nothing proves nothing,
        # and vLLM 0.32's stock LoRA on CPU alters base requests batched with adapter ones
        tokens = {}
        for group in (names, [None]):
            pairs = [(i, p, n) for n in group for i, p in enumerate(spec["prompts"])]
            outs = llm.generate([TokensPrompt(prompt_token_ids=p) for _, p, _ in pairs], params,
                                lora_request=_requests(spec, [n for _, _, n in pairs]), use_tqdm=False)
            tokens.update({f"{n}|{i}": list(o.outputs[0].token_ids) for (i, _, n), o in zip(pairs, outs, strict=True)})
        return {"tokens": tokens}
    ps = prompts(spec["requests"], spec["prompt_len"], spec["vocab"], seed=1)
    result = {}
    for workload in spec["workloads"]:  # "adapters": request i uses adapter i mod n; "base": none
        chosen = [names[i % len(names)] if workload == "adapters" else None for i in range(len(ps))]
        reqs = _requests(spec, chosen) if spec["mode"] != "base" else None
        batch = [TokensPrompt(prompt_token_ids=p) for p in ps]
        llm.generate(batch[:8], params, lora_request=reqs[:8] if reqs else None, use_tqdm=False)  # warm-up
        t = time.perf_counter()
        llm.generate(batch, params, lora_request=reqs, use_tqdm=False)
        seconds = time.perf_counter() - t
        result[workload] = {"requests_per_s": round(len(ps) / seconds, 2), "seconds": round(seconds, 2)}
    return result

if __name__ == "__main__":
    print(RESULT + json.dumps(child(json.loads(sys.argv[1]))), flush=True)
