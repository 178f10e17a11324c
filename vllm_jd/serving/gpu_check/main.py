"""``vllm-jd gpu-check``: prepare, kernel checks, engine checks; one JSON line per figure on
stdout, exit 1 when any parity check fails (2 on bad arguments, as every command)."""

from __future__ import annotations

import json
import tempfile
from itertools import chain
from pathlib import Path

import torch

from vllm_jd.serving.gpu_check import engines
from vllm_jd.serving.gpu_check.prepare import SCALES, Scale, prepare

PARITY_ADAPTERS = 8


class Report:
    """Prints each figure as a JSON line and remembers the checks that failed."""

    def __init__(self):
        self.failed: list[str] = []

    def __call__(self, line: dict) -> None:
        if line.get("ok") is False and line["check"] != "summary":
            self.failed.append(line["check"])
        print(json.dumps(line), flush=True)


def _environment(device: str) -> dict:
    import triton
    import vllm

    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return {"check": "environment", "device": name, "vllm": vllm.__version__, "torch": torch.__version__,
            "triton": triton.__version__}


def _matched_max_loras(scale: Scale) -> int:
    """vLLM LoRA slots holding as many bytes as our bases and Σ table (q/k/v, per layer)."""
    kv = scale.kv_heads * scale.hidden // scale.heads
    width = 3 * scale.hidden + scale.hidden + 2 * kv  # d_in of q, k, v plus their outputs
    ours = scale.clusters * scale.rank * width + scale.adapters * 3 * scale.rank**2
    return max(1, ours // (scale.rank * width))


def engine_parity(paths: dict, scale: Scale, device: str, report: Report) -> None:
    """(d) greedy tokens of vllm-jd (store) and vLLM's LoRA (exported adapters), float32."""
    from vllm_jd.compress.export import export

    names = sorted(p.name for p in paths["adapters"].iterdir())[:PARITY_ADAPTERS]
    exported = {n: paths["store"].parent / "exported" / n for n in names}
    for n, folder in exported.items():
        if not (folder / "adapter_config.json").exists():  # kept from an earlier run of the same folder
            export(paths["store"], n, folder)
    exported = {n: str(folder) for n, folder in exported.items()}
    common = dict(model=str(paths["model"]), dtype="float32", store=str(paths["store"]), adapters=exported,
                  prompts=engines.prompts(4, 24, 2048), max_tokens=12, max_lora_rank=scale.rank,
                  max_loras=PARITY_ADAPTERS, task="tokens", engine=_engine_options(device))
    got = {mode: engines.run({**common, "mode": mode, "eager": mode == "stock" or device != "cuda"})
           for mode in ("jd", "stock")}
    if errors := [r["error"] for r in got.values() if "error" in r]:
        report({"check": "engine_parity", "ok": False, "detail": errors[0]})
        return
    jd, stock = got["jd"]["tokens"], got["stock"]["tokens"]
    differ = sorted(k for k in stock if jd.get(k) != stock[k])
    changed = sum(stock[k] != stock[f"None|{k.split('|')[1]}"] for k in stock if not k.startswith("None|"))
    report({"check": "engine_parity", "adapters": len(names), "sequences": len(stock), "differ": len(differ),
            "first_differing": differ[:3], "adapter_sequences_unlike_base": changed, "ok": not differ and changed > 0})


def _engine_options(device: str) -> dict:
    if device == "cuda":
        return {"gpu_memory_utilization": 0.5, "compilation_config": {"cudagraph_capture_sizes": [1, 2, 4, 8, 16, 32,
                                                                                                 64, 128, 256]}}
    return {"kv_cache_memory_bytes": 64 * 2**20}


def engine_throughput(paths: dict, scale: Scale, device: str, report: Report) -> None:
    """(d) requests/s: vllm-jd with every adapter (CUDA graphs on), the base model, vLLM's LoRA at matched memory."""
    adapters = {p.name: str(p) for p in sorted(paths["adapters"].iterdir())}
    slots = _matched_max_loras(scale)
    common = dict(model=str(paths["model"]), dtype="bfloat16", store=str(paths["store"]), adapters=adapters,
                  max_tokens=64, max_lora_rank=scale.rank, task="throughput", requests=len(adapters), prompt_len=64,
                  vocab=2048, max_num_seqs=256, max_model_len=512, engine=_engine_options(device))
    runs = {"vllm-jd": {**common, "mode": "jd", "max_loras": 256, "workloads": ["adapters", "base"]},
            "base": {**common, "mode": "base", "adapters": {}, "workloads": ["base"]},
            "vllm-lora": {**common, "mode": "stock", "max_loras": slots, "workloads": ["adapters"]}}
    results = {name: engines.run(spec) for name, spec in runs.items()}
    for name, r in results.items():
        if "error" in r:
            report({"check": "throughput", "engine": name, "ok": False, "detail": r["error"]})
    if any("error" in r for r in results.values()):
        return
    base = results["base"]["base"]["requests_per_s"]
    for name, workload in (("vllm-jd", "adapters"), ("vllm-jd", "base"), ("vllm-lora", "adapters")):
        rps = results[name][workload]["requests_per_s"]
        report({"check": "throughput", "engine": name, "requests": workload, "adapters": len(adapters),
                "max_loras": runs[name].get("max_loras"), "requests_per_s": rps, "vs_base_model": round(rps / base, 3)})


def run(out: Path | None, scale_name: str | None, engines_too: bool = True) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    scale = SCALES[scale_name or ("mistral" if device == "cuda" else "tiny")]
    report = Report()
    report(_environment(device))
    root = out or Path(tempfile.mkdtemp(prefix="vllm-jd-gpu-check-"))
    paths = prepare(root, scale, device, report)
    if device == "cuda":
        from vllm_jd.serving.gpu_check import kernels

        for line in chain(kernels.parity(), kernels.graph_replay(), kernels.graph_replay(T=256), kernels.timing()):
            report(line)
    else:
        report({"check": "kernels", "skipped": "no CUDA device: kernel parity, graph replay and timing need one"})
    if engines_too:
        engine_parity(paths, scale, device, report)
        if device == "cuda":
            engine_throughput(paths, scale, device, report)
        else:
            report({"check": "throughput", "skipped": "no CUDA device"})
    report({"check": "summary", "ok": not report.failed, "failed": list(report.failed), "work_dir": str(root)})
    return 1 if report.failed else 0
