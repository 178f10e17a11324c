"""Build a trained adapter zoo in a folder: base model, one LoRA per task (or several), held-out
examples.

    DIR/model/            LlamaForCausalLM (safetensors, float32) + its byte-level tokenizer
    DIR/adapters/<name>/  PEFT LoRA adapters (``save_pretrained``), name ``<task>-<j>``
    DIR/tasks/<task>.jsonl  held-out examples, one ``{"prompt": ..., "answer": ...}`` a line
    DIR/zoo.json          the config, adapter → task, accuracies measured with transformers, times

Held-out prompts never occur in any training set. Everything is deterministic in the config.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from vllm_jd.zoo.data import encode_examples, greedy, make_char_tokenizer
from vllm_jd.zoo.tasks import exact_match, examples, select_tasks
from vllm_jd.zoo.train import (
    ATTENTION_TARGETS,
    LoraConfig,
    ModelConfig,
    TrainConfig,
    config_dict,
    train_base,
    train_lora,
)

logger = logging.getLogger(__name__)


@dataclass
class ZooConfig:
    """Everything ``make_zoo`` needs. The defaults are the documented zoo (8 tasks)."""

    tasks: int = 8
    adapters_per_task: int = 1
    seed: int = 0
    train_per_task: int = 1000
    test_per_task: int = 100
    max_new_tokens: int = 16
    model: ModelConfig = field(default_factory=ModelConfig)
    base: TrainConfig = field(default_factory=lambda: TrainConfig(steps=350, batch_size=64, lr=3e-3))
    adapter: TrainConfig = field(default_factory=lambda: TrainConfig(steps=300, batch_size=32, lr=3e-3, warmup=20))
    lora: LoraConfig = field(default_factory=LoraConfig)
    vary: bool = False
    """Adapters of a task differ in rank (4, 8, 16 in turn) and targets (every second one on
    attention only), as a provider's do; otherwise all use ``lora``."""


def widened(model: ModelConfig, hidden: int) -> ModelConfig:
    """``model`` at width ``hidden`` (a multiple of 64): 64-wide heads, half as many KV heads,
    MLP 2 × hidden. Wider layers are the regime of real models, where a shared basis and Σ_i are
    small next to each adapter (docs/quality.md)."""
    if hidden < 64 or hidden % 64:
        raise ValueError(f"--hidden {hidden}: expected a multiple of 64")
    heads = hidden // 64
    return ModelConfig(hidden=hidden, layers=model.layers, heads=heads, kv_heads=max(1, heads // 2),
                       intermediate=2 * hidden, vocab_size=model.vocab_size)


def micro_config(tasks: int = 2, seed: int = 0) -> ZooConfig:
    """A zoo small enough for unit tests (seconds): 1 layer, hidden 64, few steps, few examples."""
    return ZooConfig(tasks=tasks, seed=seed, train_per_task=200, test_per_task=20, max_new_tokens=10,
                     model=ModelConfig(hidden=64, layers=1, heads=1, kv_heads=1, intermediate=128),
                     base=TrainConfig(steps=60, batch_size=16, lr=1e-2, warmup=5, log_every=20),
                     adapter=TrainConfig(steps=40, batch_size=16, lr=1e-2, warmup=5, log_every=20),
                     lora=LoraConfig(rank=4, alpha=8))


def accuracy(model, tok, pairs: list[tuple[str, str]], max_new_tokens: int) -> float:
    """Exact-match accuracy of greedy decoding on ``(prompt, answer)`` pairs."""
    outs = greedy(model, tok, [p for p, _ in pairs], max_new_tokens)
    return sum(exact_match(o, a) for o, (_, a) in zip(outs, pairs, strict=True)) / len(pairs)


def varied(lora: LoraConfig, j: int) -> LoraConfig:
    """Adapter ``j``'s LoRA settings in a varied zoo: rank 4, 8, 16 in turn (alpha 2·rank), every
    second one on the attention projections only."""
    rank = (4, 8, 16)[j % 3]
    targets = ATTENTION_TARGETS if j % 2 else lora.targets
    return LoraConfig(rank=rank, alpha=2 * rank, targets=targets)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _save_base(model, tok, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["torch_dtype"] = "float32"
    cfg_path.write_text(json.dumps(cfg, indent=2))


def make_zoo(out: str | Path, cfg: ZooConfig | None = None, resume: bool = False) -> dict:
    """Train and write the zoo under ``out`` (created; must be empty or absent); returns zoo.json's dict.

    resume: ``out`` holds an interrupted run of the same config (``zoo_config.json``): the saved
    base model and every adapter already saved (with its ``zoo_entry.json``) are kept, the rest
    is trained. Training is deterministic, so the result is the zoo an uninterrupted run writes;
    a zoo of a wide model (hours on 2 cores) can be built over several sessions.
    """
    cfg = cfg or ZooConfig()
    out = Path(out)
    _check_out(out, cfg, resume)
    tasks = select_tasks(cfg.tasks)
    if cfg.adapters_per_task < 1:
        raise ValueError("adapters_per_task must be at least 1")
    t_start = time.perf_counter()
    tok = make_char_tokenizer()
    test, train = _write_tasks(out, tasks, cfg)
    base, base_info = _base(out, tok, tasks, test, train, cfg)
    adapters: dict[str, dict] = {}
    for task in tasks:
        for j in range(cfg.adapters_per_task):
            base, adapters[f"{task.name}-{j}"] = _adapter(out, base, tok, tasks, task, j, test, train, cfg,
                                                          base_info["accuracy"][task.name])
    zoo = {"format": 1, "model": "model", "adapters_dir": "adapters", "tasks_dir": "tasks",
           "tasks": {t.name: t.description for t in tasks}, "adapters": adapters, "base_accuracy": base_info["accuracy"],
           "base_loss_first": base_info["loss_first"], "base_loss_last": base_info["loss_last"],
           "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed,
           "config": {**config_dict(cfg.model, cfg.lora), "base": config_dict(cfg.base)["TrainConfig"],
                      "adapter": config_dict(cfg.adapter)["TrainConfig"], "tasks": cfg.tasks,
                      "adapters_per_task": cfg.adapters_per_task, "vary": cfg.vary, "train_per_task": cfg.train_per_task,
                      "test_per_task": cfg.test_per_task},
           "seconds": {"base": base_info["seconds"], "total": round(time.perf_counter() - t_start, 1)},
           "torch_threads": torch.get_num_threads()}
    (out / "zoo.json").write_text(json.dumps(zoo, indent=1))
    return zoo


def _check_out(out: Path, cfg: ZooConfig, resume: bool) -> None:
    """A new zoo needs an empty ``out``; a resumed one the same config (recorded at the start)."""
    recorded = out / "zoo_config.json"
    wanted = json.dumps(asdict(cfg), sort_keys=True)
    if resume and recorded.exists():
        if recorded.read_text() != wanted:
            raise ValueError(f"{out} was started with another config ({recorded}); resume it with the same options")
        return
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty" + ("" if resume else " (--resume continues a run)"))
    out.mkdir(parents=True, exist_ok=True)
    recorded.write_text(wanted)


def _write_tasks(out: Path, tasks: list, cfg: ZooConfig) -> tuple[dict, dict]:
    """Held-out examples (written) and training samples per task: [0] the base mixture, [j + 1] adapter j."""
    (out / "tasks").mkdir(parents=True, exist_ok=True)
    test, train = {}, {}
    for task in tasks:
        test[task.name] = examples(task, cfg.test_per_task, seed=10_000 + cfg.seed)
        held = {p for p, _ in test[task.name]}
        train[task.name] = [examples(task, cfg.train_per_task, seed=cfg.seed * 100 + j, exclude=held)
                            for j in range(cfg.adapters_per_task + 1)]
        with open(out / "tasks" / f"{task.name}.jsonl", "w") as f:
            f.writelines(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in test[task.name])
    return test, train


def _base(out: Path, tok, tasks: list, test: dict, train: dict, cfg: ZooConfig):
    """The base model, trained and saved (or read back when a resumed run saved it), and its info."""
    model_dir, info_path = out / "model", out / "model" / "zoo_base.json"
    if info_path.exists():
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        base.config._name_or_path = str(model_dir.resolve())
        logger.info("base model read back from %s (resumed)", model_dir)
        return base, json.loads(info_path.read_text())
    t0 = time.perf_counter()
    mixture = [e for task in tasks for e in encode_examples(tok, train[task.name][0])]
    base, losses = train_base(cfg.model, mixture, cfg.base, cfg.seed)
    _save_base(base, tok, model_dir)
    base.config._name_or_path = str(model_dir.resolve())
    acc = {t.name: accuracy(base, tok, test[t.name], cfg.max_new_tokens) for t in tasks}
    info = {"accuracy": acc, "loss_first": _mean(losses[:10]), "loss_last": _mean(losses[-10:]),
            "seconds": round(time.perf_counter() - t0, 1)}
    info_path.write_text(json.dumps(info))  # last: its presence means the base is complete
    logger.info("base accuracy %s (%.0f s)", {k: round(v, 3) for k, v in acc.items()}, info["seconds"])
    return base, info


def _adapter(out: Path, base, tok, tasks: list, task, j: int, test: dict, train: dict, cfg: ZooConfig,
             base_acc: float):
    """Adapter ``<task>-<j>``, trained and saved (or kept, if a resumed run saved it); (base, entry)."""
    name = f"{task.name}-{j}"
    entry_path = out / "adapters" / name / "zoo_entry.json"
    if entry_path.exists():
        return base, json.loads(entry_path.read_text())
    seed = cfg.seed * 1000 + 17 * j + tasks.index(task) + 1
    lora = varied(cfg.lora, j) if cfg.vary else cfg.lora
    peft_model, losses = train_lora(base, encode_examples(tok, train[task.name][j + 1]), lora, cfg.adapter, seed, name)
    acc = accuracy(peft_model, tok, test[task.name], cfg.max_new_tokens)
    peft_model.save_pretrained(str(out / "adapters" / name), safe_serialization=True)
    entry = {"task": task.name, "seed": seed, "rank": lora.rank, "targets": list(lora.targets), "accuracy": acc,
             "base_accuracy": base_acc, "loss_first": _mean(losses[:10]), "loss_last": _mean(losses[-10:])}
    entry_path.write_text(json.dumps(entry))  # last: its presence means the adapter is complete
    logger.info("adapter %s: accuracy %.3f (base %.3f)", name, acc, base_acc)
    return peft_model.unload(), entry


def read_tasks(zoo: str | Path) -> dict[str, list[tuple[str, str]]]:
    """Held-out ``(prompt, answer)`` pairs of a zoo, by task name."""
    out = {}
    for path in sorted((Path(zoo) / "tasks").glob("*.jsonl")):
        out[path.stem] = [(r["prompt"], r["answer"]) for r in map(json.loads, path.read_text().splitlines())]
    return out
