"""The GPU path's byte model (``kernels/gpu/plan.py``, ``decode_model.py``) for Mistral-7B on an
H100: predicted share of base-model decode throughput with LoRA on q/k/v, for the cluster-grouped
kernels and, beside them, the earlier per-adapter kernels. A model, not a measurement: no GPU runs.

    python bench/gpu_model.py [--batches 64 256] [--ranks 16 64] [--clusters 8]

One JSON line per (kernels, batch, rank); ``ratio`` = base step / (base step + op).
"""

from __future__ import annotations

import argparse
import json

from vllm_jd.kernels.gpu.decode_model import decode_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    p.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    p.add_argument("--clusters", type=int, default=8)
    p.add_argument("--adapters", type=int, default=1024)
    p.add_argument("--context", type=int, default=512)
    args = p.parse_args()
    for rank in args.ranks:
        for batch in args.batches:
            for kernels in ("cluster", "per_adapter"):
                line = decode_step(batch, args.context, args.adapters, args.clusters, rank, kernels)
                print(json.dumps({"bench": "gpu_model", "device": "H100 (model, 3.35 TB/s, 4 us per launch)",
                                  **line}), flush=True)


if __name__ == "__main__":
    main()
