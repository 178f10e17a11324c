"""Registration latency of one Mistral-7B-sized adapter while serving (issue: scheduling).

What ``/v1/load_lora_adapter`` does before vLLM loads the name: path checks, reading the PEFT
adapter (rank 16 on q/k/v of 32 layers, 4096→4096 / 4096→1024, 38 MB fp32), projecting it onto
every shared cluster of the store, writing its Σ shard and the manifest atomically. The store
is a JD-Full rank-64 store of Mistral-shaped synthetic adapters (few adapters: the projection
costs per cluster and module, not per stored adapter); the manifest write is also timed with
10,000 adapters in it. Then the worker's side: reading the new Σ rows from the store for every
module. One JSON line per figure; goal < 1 s.

    python bench/registration.py [--clusters 4] [--adapters 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from pathlib import Path

from vllm_jd.compress.pipeline import compress_adapters
from vllm_jd.compress.synthetic import write_adapter
from vllm_jd.config import CompressConfig
from vllm_jd.serving.registration import register
from vllm_jd.store.format import TensorReader, read_manifest, write_manifest

_spec = importlib.util.spec_from_file_location("bench_compress", Path(__file__).with_name("compress.py"))
bench_compress = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_compress)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clusters", type=int, default=4)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    modules, pool = bench_compress.mistral_adapters(args.layers, args.adapters + args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        compress_adapters(pool[: args.adapters], tmp / "store", CompressConfig(rank=64, clusters=args.clusters, iters=3),
                          progress=False)
        print(json.dumps({"bench": "registration_setup", "store_seconds": round(time.perf_counter() - t, 1),
                          "modules": len(modules), "clusters": args.clusters}), flush=True)
        root = tmp / "root"
        for k, a in enumerate(pool[args.adapters:]):  # new adapters, written as PEFT folders
            mods = {m: (a.factors(m)[0], (a.factors(m)[1] / 2.0).T.contiguous()) for m in modules}
            write_adapter(root / f"new-{k}", mods, rank=16, alpha=32)
        times = []
        for k in range(args.repeats):
            t = time.perf_counter()
            added = register(tmp / "store", f"new-{k}", f"new-{k}", str(root), 0.5)
            times.append(time.perf_counter() - t)
        size = sum(f.stat().st_size for f in (root / "new-0").iterdir())
        m = read_manifest(tmp / "store")
        t = time.perf_counter()
        reader = TensorReader(tmp / "store", m)
        for mod in modules:  # what each worker reads for one new adapter
            reader.sigma("new-0", mod)
        worker = time.perf_counter() - t
        big = m.model_copy(deep=True)  # the manifest of a 10,000-adapter store
        one = next(iter(big.adapters.values()))
        big.adapters = {f"a{i:05d}": one for i in range(10_000)}
        t = time.perf_counter()
        write_manifest(tmp / "store", big)
        manifest_10k = time.perf_counter() - t
        write_manifest(tmp / "store", m)
        print(json.dumps({"bench": "registration", "adapter_bytes": size, "kind": added.kind, "error": round(added.error, 4),
                          "seconds": [round(x, 3) for x in times], "median_seconds": round(sorted(times)[len(times) // 2], 3),
                          "worker_sigma_read_seconds": round(worker, 3), "manifest_write_10k_adapters_seconds":
                          round(manifest_10k, 3), "goal_seconds": 1.0}), flush=True)


if __name__ == "__main__":
    main()
