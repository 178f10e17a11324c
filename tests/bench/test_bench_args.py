"""Benchmarks refuse impossible settings with a clear message before starting any server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def paper(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / "throughput.py"), "--protocol", "paper", "--workdir",
                           str(tmp_path / "work"), "--out", str(tmp_path / "out"), *args],
                          capture_output=True, text=True, timeout=120)


def fake_model(root: Path, hidden: int = 64, weights: bool = True) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"hidden_size": hidden, "num_attention_heads": 2,
                                                  "num_key_value_heads": 1, "num_hidden_layers": 1,
                                                  "intermediate_size": 128}))
    if weights:
        (root / "model.safetensors").write_bytes(b"")
    return root


def test_model_without_weights(tmp_path):
    p = paper(tmp_path, "--model", str(fake_model(tmp_path / "m", weights=False)), "--ns", "4")
    assert p.returncode != 0 and "no weights" in p.stderr, p.stderr


def test_rank_above_a_module_dimension(tmp_path):
    # N = 32 is served at rank 64 (App. E); k/v of this model map 64 → 32
    p = paper(tmp_path, "--model", str(fake_model(tmp_path / "m")), "--ns", "32")
    assert p.returncode != 0 and "rank 64 is above the smallest module dimension 32" in p.stderr, p.stderr


def test_more_unique_adapters_than_available(tmp_path):
    from vllm_jd.compress.synthetic import make_adapters
    from vllm_jd.tiny_model import llama_lora_modules

    mods = llama_lora_modules(64, 1, 2, 1, 128, targets=("q_proj", "k_proj", "v_proj"))
    make_adapters(tmp_path / "ad", 3, mods, rank=4)
    p = paper(tmp_path, "--model", str(fake_model(tmp_path / "m")), "--ns", "4", "--adapters-dir", str(tmp_path / "ad"))
    assert p.returncode != 0 and "needs 4 adapters" in p.stderr and "has 3" in p.stderr, p.stderr


def test_bad_workload_options(tmp_path):
    m = str(fake_model(tmp_path / "m"))
    for opt, val, msg in (("--popularity", "pareto", "expected uniform or zipf"),
                          ("--arrival", "burst", "expected all or poisson"),
                          ("--output-len", "9-3", "LO ≤ HI"), ("--ns", "4,x", "comma-separated")):
        p = paper(tmp_path, "--model", m, "--ns", "4", opt, val) if opt != "--ns" else paper(tmp_path, "--model", m, opt, val)
        assert p.returncode != 0 and msg in p.stderr, (opt, p.stderr)
    assert not (tmp_path / "out").exists()  # nothing ran


def test_scheduling_bench_refuses_bad_settings_and_replays_the_same_jobs(monkeypatch):
    sys.path.insert(0, str(BENCH))
    try:
        import scheduling
    finally:
        sys.path.remove(str(BENCH))
    for bad, message in ((["--k", "0"], "--k"), (["--rate", "0"], "--rate"), (["--policies", "lifo"], "lifo"),
                         (["--adapters", "8", "--clusters", "16"], "--adapters")):
        p = subprocess.run([sys.executable, str(BENCH / "scheduling.py"), *bad], capture_output=True, text=True,
                           timeout=120)
        assert p.returncode != 0 and message in p.stderr, (bad, p.stderr)
    args = scheduling.parse_args(["--requests", "50", "--rate", "10"])
    names = [f"a{i}" for i in range(32)]
    jobs, arrivals = scheduling.jobs_for(names, "zipf:1.0", args)
    again, arrivals2 = scheduling.jobs_for(names, "zipf:1.0", args)
    assert jobs == again and arrivals == arrivals2  # both policies get the same requests
    assert len(jobs) == 50 and arrivals == sorted(arrivals) and arrivals[-1] > 1.0  # Poisson at 10/s
    assert sum(j["model"] == "a0" for j in jobs) > sum(j["model"] == "a31" for j in jobs)  # Zipf head


def test_replicas_bench_refuses_bad_settings():
    for bad, message in ((["--replicas", "0"], "--replicas"), (["--routings", "random"], "random"),
                         (["--rate", "-1"], "--rate")):
        p = subprocess.run([sys.executable, str(BENCH / "replicas.py"), *bad], capture_output=True, text=True,
                           timeout=120)
        assert p.returncode != 0 and message in p.stderr, (bad, p.stderr)
