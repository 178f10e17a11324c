"""Write the tiny offline Llama (random weights, byte-level BPE tokenizer) used by the demo.

    python scripts/make_tiny_model.py OUT [--hidden 256] [--layers 2] [--dtype bfloat16]
"""

import argparse
import logging
from pathlib import Path

import torch

from vllm_jd.tiny_model import make_tiny_llama

logger = logging.getLogger("make_tiny_model")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    make_tiny_llama(args.out, hidden=args.hidden, layers=args.layers, dtype=getattr(torch, args.dtype))
    logger.info("wrote a tiny Llama (hidden %d, %d layers, %s) to %s", args.hidden, args.layers, args.dtype, args.out)


if __name__ == "__main__":
    main()
