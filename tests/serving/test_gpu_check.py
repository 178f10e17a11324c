"""``vllm-jd gpu-check`` on CPU: the parts that need no GPU (model, adapters, compress, served-token
parity against vLLM's own LoRA, the JSON report) run here; the kernel parts report themselves
skipped. On a GPU the same command runs everything (docs/gpu.md)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vllm_jd.serving.gpu_check import engines, main


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    proc = subprocess.run([sys.executable, "-m", "vllm_jd.cli", "gpu-check", "--out", str(out)], capture_output=True,
                          text=True, timeout=600)
    return out, proc


def test_runs_offline_and_prints_only_json_lines(checked):
    out, proc = checked
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]  # every line is JSON
    by = {d["check"]: d for d in lines}
    assert [d["check"] for d in lines][:4] == ["environment", "prepare_model", "prepare_adapters", "compress"]
    assert by["kernels"]["skipped"].startswith("no CUDA device")
    parity = by["engine_parity"]
    assert parity["ok"] and parity["differ"] == 0 and parity["sequences"] == 36
    assert parity["adapter_sequences_unlike_base"] > 16  # the adapters really change the output
    assert by["summary"] == {"check": "summary", "ok": True, "failed": [], "work_dir": str(out)}
    assert (out / "store" / "manifest.json").exists() and len(list((out / "adapters").iterdir())) == 16


def test_a_parity_failure_exits_1(checked, monkeypatch, capsys):
    out, _ = checked
    real = engines.run

    def one_token_off(spec, timeout=900):
        result = real(spec, timeout)
        if spec["mode"] == "jd":
            key = next(k for k in result["tokens"] if not k.startswith("None|"))
            result["tokens"][key] = result["tokens"][key][:-1] + [result["tokens"][key][-1] + 1]
        return result

    monkeypatch.setattr(engines, "run", one_token_off)
    assert main.run(out, "tiny") == 1  # the folder is reused: nothing is built again
    by = {d["check"]: d for d in map(json.loads, capsys.readouterr().out.splitlines())}
    assert by["engine_parity"]["differ"] == 1 and not by["engine_parity"]["ok"]
    assert by["summary"]["failed"] == ["engine_parity"] and not by["summary"]["ok"]
