"""The verify → repair loop on a trained zoo (``scripts/make_zoo.py``), each adapter measured on
its own task's prompts.

    python bench/repair.py --zoo DIR --store STORE --out OUT [--threshold 0.95] [--prompts-per-task 8]
                           [--max-tokens 16]

1. Writes ``OUT/prompts.jsonl``: the first ``--prompts-per-task`` held-out prompts of each task,
   each line naming that task's adapters (``"adapters": [...]``, docs/quality.md), so every
   adapter is verified on its own traffic as a provider would, not on other tasks' prompts.
2. Copies STORE to ``OUT/repaired`` and runs ``vllm-jd verify --repair --threshold T --json``,
   then ``vllm-jd compact`` on it (the repaired adapters' old Σ rows and clusters dropped).

The repaired store is measured as it is: not recompressed (``compress --from-store`` would re-fit
the shared clusters, and the adapters verified there would no longer be what was verified);
compaction leaves every adapter bit-for-bit as verified. ``mib_stored`` shows the store before,
after repair, and after compaction.

Prints one JSON line: adapters verified and repaired, agreement before and after, parameters
saved before and after (``compress.report.summarize``), seconds. Task accuracy of the result:
``python bench/quality.py --zoo DIR --methods none --store repaired=OUT/repaired``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path


def own_prompts(zoo: Path, per_task: int) -> list[dict]:
    """One line per held-out prompt: the prompt and the adapters of its task."""
    from vllm_jd.zoo.build import read_tasks

    meta = json.loads((zoo / "zoo.json").read_text())
    by_task: dict[str, list[str]] = {}
    for name, a in sorted(meta["adapters"].items()):
        by_task.setdefault(a["task"], []).append(name)
    tasks = read_tasks(zoo)
    return [{"prompt": p, "adapters": names} for task, names in sorted(by_task.items())
            for p, _ in tasks[task][:per_task]]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vllm_jd.cli", *args], capture_output=True, text=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, required=True)
    ap.add_argument("--store", type=Path, required=True, help="a store built from the zoo's adapters (not written)")
    ap.add_argument("--out", type=Path, required=True, help="folder for prompts, the repaired and the clean store")
    ap.add_argument("--threshold", type=float, default=0.95)
    ap.add_argument("--prompts-per-task", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args(argv)
    from vllm_jd.compress.report import summarize

    args.out.mkdir(parents=True, exist_ok=True)
    prompts = args.out / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(x) + "\n" for x in own_prompts(args.zoo, args.prompts_per_task)))
    repaired = args.out / "repaired"
    shutil.rmtree(repaired, ignore_errors=True)
    shutil.copytree(args.store, repaired)
    t0 = time.perf_counter()
    done = cli("-q", "verify", str(repaired), "--model", str(args.zoo / "model"), "--prompts", str(prompts),
               "--max-tokens", str(args.max_tokens), "--threshold", str(args.threshold), "--repair", "--json")
    seconds = time.perf_counter() - t0
    if done.returncode not in (0, 1):
        print(f"repair: verify failed ({done.returncode}): {done.stderr[-2000:]}", file=sys.stderr)
        return 1
    (args.out / "verify.jsonl").write_text(done.stdout)
    lines = [json.loads(x) for x in done.stdout.splitlines() if x.startswith("{")]
    before = [r for r in lines if "stage" not in r]
    after = [r for r in lines if r.get("stage") == "after repair"]
    summary = {s: summarize(s) for s in (args.store, repaired)}
    uncompacted = summary[repaired]["bytes_stored"]["total"]
    compacted = cli("-q", "compact", str(repaired))  # drop the repaired adapters' old Σ rows (and clusters)
    if compacted.returncode != 0:
        print(f"repair: compact failed: {compacted.stderr[-2000:]}", file=sys.stderr)
        return 1
    summary[repaired] = summarize(repaired)
    saved = lambda s: round(summary[s]["params_saved"]["total"], 4)  # noqa: E731
    print(json.dumps({
        "bench": "repair", "store": str(args.store), "threshold": args.threshold,
        "prompts": f"{args.prompts_per_task} held-out prompts of each adapter's own task, --max-tokens {args.max_tokens}",
        "adapters": len(before), "repaired": len(after),
        "agreement_before": {"mean": round(sum(r["agreement"] for r in before) / len(before), 4),
                             "min": min(r["agreement"] for r in before)},
        "agreement_after_min": min((r["agreement"] for r in after), default=None),
        "params_saved_total": {"before": saved(args.store), "after": saved(repaired)},
        "mib_stored": {"before": round(summary[args.store]["bytes_stored"]["total"] / 2**20, 2),
                       "after_repair": round(uncompacted / 2**20, 2),
                       "after_compact": round(summary[repaired]["bytes_stored"]["total"] / 2**20, 2)},
        "verify_repair_seconds": round(seconds, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
