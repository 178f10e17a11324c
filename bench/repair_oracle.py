"""The most a repair could save: every adapter that kept < 99% of its task accuracy stored exactly,
every other one left where it is, on the settings ``bench/quality.py`` measured.

    python bench/repair_oracle.py --quality OUT/quality.jsonl --store LABEL=STORE [--store ...]

LABEL is a store's label in the quality file (``quality.py --store LABEL=STORE``). Prints one JSON
line per store: adapters below 99%, parameters saved before, and with the oracle's repair. An
exact singleton costs its LoRA's parameters plus its Σ_i (r_i² per module), as ``add`` stores it;
a shared cluster's basis counts while any member stays (``compress.accounting``). No repair
driven by measurement (``verify --repair``) can save more while keeping every adapter ≥ 99%.
"""

from __future__ import annotations

import argparse
import json

from vllm_jd.compress.accounting import account
from vllm_jd.store.format import read_manifest


def oracle(per_adapter: dict[str, float], original: dict[str, float], store: str) -> dict:
    m = read_manifest(store)
    acc = account(m)
    kept = {n: per_adapter[n] / original[n] if original[n] else 1.0 for n in original}
    below = {n for n, k in kept.items() if k < 0.99}
    sigma = dict(zip(m.adapters, acc.sigma_params, strict=True))
    held = {a.cluster for n, a in m.adapters.items() if n not in below}
    used = sum(b for c, b in enumerate(acc.basis_params) if c in held)
    used += sum(s for n, s in sigma.items() if n not in below)
    for n in below:
        a = m.adapters[n]
        used += a.lora_params + sum(e is not None for e in a.module_errors) * a.rank**2
    return {"below_99": len(below), "params_saved_total": round(acc.total_saved, 4),
            "oracle_params_saved_total": round(1 - used / acc.lora_params, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quality", required=True, help="quality.jsonl written by bench/quality.py")
    ap.add_argument("--store", action="append", required=True, metavar="LABEL=STORE")
    args = ap.parse_args()
    lines = [json.loads(x) for x in open(args.quality)]
    by_label = {r.get("label", r["method"]): r for r in lines}
    original = by_label["original"]["per_adapter"]
    for spec in args.store:
        label, _, store = spec.partition("=")
        if label not in by_label:
            ap.error(f"--store {spec}: no line labelled {label!r} in {args.quality}")
        print(json.dumps({"bench": "repair_oracle", "store": label,
                          **oracle(by_label[label]["per_adapter"], original, store)}))


if __name__ == "__main__":
    main()
