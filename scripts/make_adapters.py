"""Write synthetic PEFT LoRA adapters for a Llama-shaped model (offline; see vllm_jd.compress.synthetic).

    python scripts/make_adapters.py OUT --n 200 --layers 2 --hidden 256 --kv-dim 128 --rank 8 --structure shared
"""

import argparse
import logging
from pathlib import Path

from vllm_jd.compress.synthetic import LLAMA_QKV, llama_modules, make_adapters

logger = logging.getLogger("make_adapters")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--kv-dim", type=int, default=128)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--structure", default="shared", help="shared | random | planted:K")
    ap.add_argument("--targets", default=",".join(LLAMA_QKV))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    modules = llama_modules(args.layers, args.hidden, args.kv_dim, tuple(args.targets.split(",")))
    paths = make_adapters(args.out, args.n, modules, args.rank, args.structure, args.seed, args.alpha)
    logger.info("wrote %d adapters (%s, rank %d, %d modules each) under %s", len(paths), args.structure, args.rank,
                len(modules), args.out)


if __name__ == "__main__":
    main()
