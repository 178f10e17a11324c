"""First request for an unknown adapter (issue: sources): time from the request to its first
token when the server fetches it from a (local, fake) Hugging Face Hub, adds it to the store
and loads it (``vllm-jd serve --jd-resolve hf``).

Model: Mistral-7B's attention shapes (hidden 4096, 32 layers, 32 query / 8 KV heads), a small
MLP (1024) and vocabulary (2,048) so it runs on this machine, dummy weights, bf16. Store: JD-Full
rank 16, 2 clusters, of 8 synthetic Mistral-sized adapters (rank 16 on q/k/v of 32 layers).
The new adapters (same kind, bf16, 19 MB each) sit on a local FakeHub (loopback HTTP, the real
``huggingface_hub`` download path). Per adapter: the client's time to first token (streaming,
1 token), the server's fetch and add seconds (its /metrics), and the rest (vLLM loads the name,
the workers read its Σ rows, prefill); the same for an adapter already served, as the baseline.

    python bench/resolve.py [--adapters 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import requests
import torch

from vllm_jd.compress.pipeline import compress_adapters
from vllm_jd.compress.synthetic import write_adapter
from vllm_jd.config import CompressConfig
from vllm_jd.testing.fake_hub import FakeHub
from vllm_jd.tiny_model import make_tokenizer

HERE = Path(__file__).parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def model_folder(out: Path) -> Path:
    from transformers import LlamaConfig

    out.mkdir(parents=True, exist_ok=True)
    make_tokenizer(out, 2048)
    LlamaConfig(hidden_size=4096, intermediate_size=1024, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=2048, max_position_embeddings=1024, tie_word_embeddings=False,
                bos_token_id=0, eos_token_id=1, pad_token_id=2, torch_dtype="bfloat16").save_pretrained(out)
    return out


def first_token(url: str, model: str) -> float:
    t = time.perf_counter()
    with requests.post(f"{url}/v1/completions", json={"model": model, "prompt": "def hello(", "max_tokens": 1,
                                                      "stream": True, "temperature": 0}, stream=True, timeout=300) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{model}: {r.status_code} {r.text}")
        for line in r.iter_lines():
            if line.startswith(b"data: ") and b'"text"' in line:
                return time.perf_counter() - t
    raise RuntimeError(f"{model}: no token")


def phase_sums(url: str) -> dict[str, float]:
    out = {}
    for line in requests.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("vllm_jd_resolution_seconds_sum{"):
            out[line.split('phase="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=3, help="unknown adapters requested one after another")
    ap.add_argument("--port", type=int, default=8473)
    args = ap.parse_args()
    machine, servers = _load("machine"), _load("servers")
    modules, pool = _load("compress").mistral_adapters(32, 8 + args.adapters)
    with tempfile.TemporaryDirectory() as tmp, FakeHub() as hub:
        tmp = Path(tmp)
        compress_adapters(pool[:8], tmp / "store", CompressConfig(rank=16, clusters=2, iters=3), progress=False)
        for k, a in enumerate(pool[8:]):
            mods = {m: (a.factors(m)[0], (a.factors(m)[1] / 2.0).T.contiguous()) for m in modules}
            folder = write_adapter(tmp / "new" / f"a{k}", mods, rank=16, alpha=32, dtype=torch.bfloat16)
            hub.add_repo(f"bench/a{k}", {f.name: f.read_bytes() for f in folder.iterdir()})
        size = sum(f.stat().st_size for f in (tmp / "new" / "a0").iterdir())
        port = args.port
        env = {"HF_HUB_OFFLINE": None, "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp / "hf"),
               "HF_HUB_DISABLE_TELEMETRY": "1", "VLLM_JD_CACHE": str(tmp / "jd"), "VLLM_CPU_KVCACHE_SPACE": "1"}
        cmd = [str(Path(sys.executable).parent / "vllm-jd"), "serve", str(model_folder(tmp / "model")),
               "--jd-store", str(tmp / "store"), "--jd-resolve", "hf", "--jd-resolve-allow", "bench/*",
               "--load-format", "dummy", "--dtype", "bfloat16", "--max-model-len", "256", "--max-num-seqs", "8",
               "--port", str(port), "--host", "127.0.0.1"]
        proc = servers.start(cmd, port, tmp / "server.log", env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            first_token(url, "syn-00000")  # warm: compiled, first step done
            paths = {k: v for k, v in machine.cpu_paths(16, modules, True).items() if k in ("cpu", "amx", "avx512_bf16",
                                                                                           "cores", "jd_path")}
            served = [first_token(url, f"syn-0000{i}") for i in range(1, 4)]
            for k in range(args.adapters):
                before = phase_sums(url)
                total = first_token(url, f"bench/a{k}")
                after = phase_sums(url)
                fetch, add = (after.get(p, 0) - before.get(p, 0) for p in ("fetch", "add"))
                print(json.dumps({"bench": "resolve", "adapter": f"bench/a{k}", "adapter_bytes": size,
                                  "first_token_s": round(total, 3), "fetch_s": round(fetch, 3), "add_s": round(add, 3),
                                  "load_and_first_token_s": round(total - fetch - add, 3),
                                  "served_adapter_first_token_s": round(min(served), 3), "goal_s": 1.5,
                                  **paths}), flush=True)
        finally:
            servers.stop(proc)


if __name__ == "__main__":
    main()
