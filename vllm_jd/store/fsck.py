"""``fsck``: find what is wrong with a store, and with ``--repair`` set it right without losing data.

It reports (``validate.check_store``, every value read) adapters whose entry or tensors are
broken, problems of the whole store, adapters quarantined earlier, and what killed writers left
behind (``transaction.leftovers``). ``--repair``, under the store's lock, moves each broken
adapter's entry to the manifest's ``quarantined`` section with its reason (never served, never
deleted: the entry is there to inspect or re-add from its source) and removes the leftovers.
Store-wide problems cannot be repaired here: they need the store rebuilt from its sources.
"""

from __future__ import annotations

from pathlib import Path

from vllm_jd.store.format import read_manifest, write_manifest
from vllm_jd.store.transaction import collect_garbage, leftovers, locked
from vllm_jd.store.validate import check_store


def fsck(store: str | Path, repair: bool = False) -> dict:
    """Check ``store`` (and repair it); a JSON-ready report. ``clean`` is True when nothing is
    (left) wrong: no store problem, no broken adapter, no leftover."""
    store = Path(store)
    manifest = read_manifest(store)
    found = check_store(store, manifest)
    report = {"store": str(store), "adapters": len(manifest.adapters) + len(manifest.broken),
              "store_problems": found.store, "adapter_problems": found.adapters,
              "quarantined": {n: q.get("reason") for n, q in manifest.quarantined.items()},
              "leftovers": [str(p) for p in leftovers(store, manifest)]}
    if repair and (found.adapters or report["leftovers"]):
        with locked(store):
            manifest = read_manifest(store)  # again, under the lock: what we change is what is there
            found = check_store(store, manifest)
            found.set_aside(manifest)
            for name, why in found.adapters.items():
                manifest.quarantined[name] = {"entry": manifest._broken.pop(name)[0], "reason": why}
            if found.adapters:
                write_manifest(store, manifest)
            removed = collect_garbage(store, manifest)
        report["repaired"] = {"quarantined": sorted(found.adapters), "removed": [str(p) for p in removed]}
        report["adapter_problems"], report["leftovers"] = {}, []
        report["quarantined"] = {n: q.get("reason") for n, q in manifest.quarantined.items()}
    report["clean"] = not (report["store_problems"] or report["adapter_problems"] or report["leftovers"])
    return report


def format_report(r: dict) -> str:
    lines = [f"{r['store']}: {r['adapters']} adapters"]
    lines += [f"  store problem: {p}" for p in r["store_problems"]]
    lines += [f"  broken adapter {n}: {why}" for n, why in sorted(r["adapter_problems"].items())]
    lines += [f"  leftover of a killed writer: {p}" for p in r["leftovers"]]
    if "repaired" in r:
        rep = r["repaired"]
        lines.append(f"  repaired: {len(rep['quarantined'])} adapters quarantined, {len(rep['removed'])} leftovers "
                     "removed")
    if r["quarantined"]:
        lines.append(f"  quarantined (not served; entries kept in the manifest): {len(r['quarantined'])}")
        lines += [f"    {n}: {why}" for n, why in sorted(r["quarantined"].items())[:20]]
    if r["clean"]:
        lines.append("  clean")
    elif r["adapter_problems"] or r["leftovers"]:
        lines.append("  run `vllm-jd fsck STORE --repair` to quarantine the broken adapters and remove the leftovers")
    return "\n".join(lines)
