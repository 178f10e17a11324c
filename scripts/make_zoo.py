"""Train a small adapter zoo offline on CPU: a tiny Llama from scratch on a synthetic multi-task
corpus, then one PEFT LoRA per task (``--adapters-per-task`` for more, each with its own seed
and training sample), plus held-out examples per task.

    python scripts/make_zoo.py --out DIR [--tasks 8] [--adapters-per-task 1] [--seed 0]
                               [--vary] [--hidden 128] [--resume] [--base-steps 350] [--base-lr 3e-3] [--adapter-steps 300] [--threads N] [--micro]

Writes DIR/model, DIR/adapters/<task>-<j>, DIR/tasks/<task>.jsonl and DIR/zoo.json (see
``vllm_jd.zoo.build``). The default takes a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from vllm_jd.zoo.build import ZooConfig, make_zoo, micro_config, widened
from vllm_jd.zoo.tasks import TASKS


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="zoo folder to create (absent or empty)")
    ap.add_argument("--tasks", type=int, default=8, help=f"number of tasks, 1..{len(TASKS)} (default 8)")
    ap.add_argument("--adapters-per-task", type=int, default=1, help="adapters per task, distinct seeds (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base-steps", type=int, default=None, help="base pre-training steps (default 350)")
    ap.add_argument("--base-lr", type=float, default=None, help="base pre-training learning rate (default 3e-3)")
    ap.add_argument("--adapter-steps", type=int, default=None, help="LoRA steps per adapter (default 300)")
    ap.add_argument("--lora-rank", type=int, default=None, help="LoRA rank (default 8, alpha = 2 × rank)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: at this model size more threads mostly add overhead)")
    ap.add_argument("--vary", action="store_true",
                    help="adapters of a task differ in rank (4/8/16) and targets (all linear / attention only)")
    ap.add_argument("--hidden", type=int, default=None,
                    help="model width, a multiple of 64 (default 128; wider is closer to real models, slower)")
    ap.add_argument("--micro", action="store_true", help="a seconds-long toy config (tests)")
    ap.add_argument("--resume", action="store_true",
                    help="continue an interrupted run in --out (same options): saved base and adapters are kept")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    cfg = micro_config(args.tasks, args.seed) if args.micro else ZooConfig(tasks=args.tasks, seed=args.seed)
    cfg.adapters_per_task, cfg.vary = args.adapters_per_task, args.vary
    try:
        if args.hidden is not None:
            cfg.model = widened(cfg.model, args.hidden)
    except ValueError as e:
        print(f"make_zoo: error: {e}", file=sys.stderr)
        return 2
    if args.base_steps is not None:
        cfg.base.steps = args.base_steps
    if args.base_lr is not None:
        cfg.base.lr = args.base_lr
    if args.adapter_steps is not None:
        cfg.adapter.steps = args.adapter_steps
    if args.lora_rank is not None:
        cfg.lora.rank, cfg.lora.alpha = args.lora_rank, 2 * args.lora_rank
    try:
        zoo = make_zoo(args.out, cfg, resume=args.resume)
    except ValueError as e:
        print(f"make_zoo: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(zoo['adapters'])} adapters on {len(zoo['tasks'])} tasks to {args.out} "
          f"in {zoo['seconds']['total']:.0f} s")
    print(f"{'adapter':<12} {'base':>6} {'adapter':>8}")
    for name, a in zoo["adapters"].items():
        print(f"{name:<12} {a['base_accuracy']:>6.2f} {a['accuracy']:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
