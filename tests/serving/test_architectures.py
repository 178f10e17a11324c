"""Every architecture we claim, served from a store exactly: for each, a tiny random model, six
adapters made by PEFT itself (ranks 4/8/16, all-linear / attention / q,v targets, rsLoRA,
rank_pattern + alpha_pattern, layers_to_transform), compressed losslessly, served through
vLLM's engine (one engine per architecture, in its own process), and compared token for token
with transformers + PEFT on the exported adapters (float32). GPT-NeoX runs on vLLM's
Transformers backend, whose module names differ from the checkpoint's (``hf_to_vllm_mapper``).
GPT-2, which vLLM serves no LoRA on, is refused before any engine starts (test_preflight.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from architectures import ARCHS, build_model, greedy_reference, make_peft_adapters

from vllm_jd.cli import main as cli

MAX_TOKENS = 8
PROMPTS = ["def hello(", "import os", "class Foo:"]

SERVE = textwrap.dedent("""
    import json, sys
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest
    from vllm_jd.serving.patch import install
    install()
    a = json.loads(sys.argv[1])
    llm = LLM(model=a["model"], enable_lora=True, max_lora_rank=64, max_loras=len(a["names"]), enforce_eager=True,
              kv_cache_memory_bytes=64 * 2**20, dtype="float32", max_model_len=256, max_num_seqs=32, seed=0)
    keys = [(n, j) for n in [None, *a["names"]] for j in range(len(a["prompts"]))]
    outs = llm.generate([{"prompt_token_ids": a["prompts"][j]} for _, j in keys],
                        SamplingParams(temperature=0, max_tokens=a["max_tokens"], ignore_eos=True),
                        lora_request=[LoRARequest(n, a["names"].index(n) + 1, a["store"]) if n else None
                                      for n, _ in keys], use_tqdm=False)
    tokens = {}
    for (n, j), o in zip(keys, outs):
        tokens.setdefault(n or "<base>", []).append(list(o.outputs[0].token_ids))
    print("TOKENS " + json.dumps(tokens))
""")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from vllm_jd.tiny_model import make_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    make_tokenizer(out, 2048)
    return out


def serve_tokens(model, store, names, prompts) -> dict:
    env = {**os.environ, "VLLM_JD_STORE": str(store), "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1"}
    spec = dict(model=str(model), store=str(store), names=names, prompts=prompts, max_tokens=MAX_TOKENS)
    proc = subprocess.run([sys.executable, "-c", SERVE, json.dumps(spec)], env=env, capture_output=True, text=True,
                          timeout=600)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("TOKENS ")), None)
    assert line is not None, (proc.stdout + proc.stderr)[-3000:]
    return json.loads(line[len("TOKENS "):])


@pytest.mark.parametrize("arch", list(ARCHS))
def test_served_exactly_as_transformers_and_peft(arch, tmp_path, tokenizer):
    from transformers import AutoTokenizer

    model = build_model(arch, tmp_path / "model", tokenizer)
    names = make_peft_adapters(arch, model, tmp_path / "adapters")
    assert cli(["-q", "compress", str(tmp_path / "adapters"), "--out", str(tmp_path / "store"), "--rank", "64",
                "--clusters", "1"]) == 0  # 6 adapters of ranks ≤ 16: their combined rank fits, so lossless
    for n in names:
        assert cli(["-q", "export", str(tmp_path / "store"), n, "--out", str(tmp_path / "exported" / n)]) == 0
    tok = AutoTokenizer.from_pretrained(str(model))
    prompts = [tok(p, add_special_tokens=False).input_ids for p in PROMPTS]
    want, loading = greedy_reference(model, tmp_path / "exported", names, prompts, MAX_TOKENS)
    assert not [w for ws in loading.values() for w in ws if "missing adapter keys" in w or "fan_in_fan_out" in w]
    assert sum(want[n] != want["<base>"] for n in names) == len(names)  # every adapter changes the output
    got = serve_tokens(model, tmp_path / "store", names, prompts)
    assert got == want
