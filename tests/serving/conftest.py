"""Serving fixtures: a tiny float32 Llama, 20 adapters on all 7 projections, their store with one
exact singleton added, the adapters exported back, and greedy references from transformers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vllm_jd.cli import main as cli
from vllm_jd.compress.synthetic import make_adapters
from vllm_jd.tiny_model import llama_lora_modules, make_tiny_llama

PROMPTS = ["def hello(", "import os", "class Foo:", "x = 1", "for i in range(", "return None", "while True:",
           "print(", "with open(", "try:", "lambda x:", "assert ", "yield from", "if __name__", "async def",
           "raise ValueError(", "from . import", "global ", "del x", "pass", "not in", "elif x", "else:", "0x"]
MAX_TOKENS = 8


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", dtype=torch.float32)


@pytest.fixture(scope="session")
def serving_store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serving")
    make_adapters(root / "adapters", 20, llama_lora_modules(), rank=8, structure="shared", seed=0, alpha=16)
    assert cli(["-q", "compress", str(root / "adapters"), "--out", str(root / "store"), "--rank", "16",
                "--clusters", "2"]) == 0
    far = make_adapters(root / "late", 1, llama_lora_modules(), rank=8, structure="random", seed=9, prefix="late")[0]
    assert cli(["-q", "add", str(root / "store"), str(far)]) == 0  # an exact singleton cluster of rank 8
    return root / "store"


@pytest.fixture(scope="session")
def adapter_names(serving_store) -> list[str]:
    from vllm_jd.store.format import read_manifest

    return list(read_manifest(serving_store).adapters)


@pytest.fixture(scope="session")
def exported(serving_store, adapter_names, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exported")
    for name in adapter_names:
        assert cli(["-q", "export", str(serving_store), name, "--out", str(out / name)]) == 0
    return out


def merged_reference(tiny_model: Path, exported: Path):
    """reference(prompt, adapter or None) → greedy token ids from transformers with the exported
    adapter (a folder under ``exported``) merged into the weights (float32)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    cache: dict = {}

    def generate(prompt: str, adapter: str | None) -> list[int]:
        key = (prompt, adapter)
        if key not in cache:
            model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
            if adapter is not None:
                model = PeftModel.from_pretrained(model, str(exported / adapter)).merge_and_unload()
            ids = tok(prompt, return_tensors="pt").input_ids
            out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=2)
            cache[key] = out[0, ids.shape[1]:].tolist()
        return cache[key]

    return generate


@pytest.fixture(scope="session")
def reference(tiny_model, exported):
    return merged_reference(tiny_model, exported)


@pytest.fixture
def reference_for(tiny_model, tmp_path):
    """reference_for(store) → the merged reference for the adapters of another store."""
    from vllm_jd.store.format import read_manifest

    def make(store: Path):
        out = tmp_path / "exported"
        for name in read_manifest(store).adapters:
            assert cli(["-q", "export", str(store), name, "--out", str(out / name)]) == 0
        return merged_reference(tiny_model, out)

    return make


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_python(code: str, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (a fresh vLLM, no plugin state from this process)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **env}
    for k, v in list(full_env.items()):
        if v is None:
            full_env.pop(k)
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=timeout)


def start_vllm_jd(model: Path, store: Path, log: Path, *extra: str, max_num_seqs: int = 32, timeout: float = 300,
                  env_overrides: dict[str, str | None] | None = None):
    """Start ``vllm-jd serve`` (vLLM's default multi-process mode) and wait for /health.
    env_overrides: variables set (None: removed) on top of the test environment.

    Returns (process, base url); fails the test with the log's tail if it exits or times out.
    """
    import time

    import requests

    port = free_port()
    exe = Path(sys.executable).parent / "vllm-jd"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("VLLM_JD_STORE", None)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    for k, v in (env_overrides or {}).items():
        env.pop(k, None) if v is None else env.__setitem__(k, v)
    with open(log, "w") as fh:
        proc = subprocess.Popen([str(exe), "serve", str(model), "--jd-store", str(store), *extra, "--host", "127.0.0.1",
                                 "--port", str(port), "--dtype", "float32", "--max-model-len", "256",
                                 "--max-num-seqs", str(max_num_seqs)], stdout=fh, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # its own process group: stop_server can end all of it
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if requests.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except requests.RequestException:
            time.sleep(0.5)
    proc.kill()
    pytest.fail(f"server did not start in {timeout:.0f} s:\n{log.read_text()[-4000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM the server; after 30 s SIGKILL its whole process group (engine core and workers
    too: killing only the API process would leave them holding ~1.5 GB each)."""
    import signal

    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
