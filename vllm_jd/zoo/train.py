"""Training loops of the zoo: a tiny Llama from scratch on the task mixture, then one PEFT LoRA
per task on that task alone. CPU, float32, deterministic for a seed (single process).

Shapes: batches are ``input_ids``/``attention_mask``/``labels`` [B, T] (T ≤ ~30 tokens); the
model is ``LlamaForCausalLM`` with ``hidden`` (H), ``layers``, ``heads`` of width 64 (H / heads),
``kv_heads``, ``intermediate`` (I); LoRA factors are A [r, d_in], B [d_out, r] per target.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field

import torch

from vllm_jd.zoo.data import batches

logger = logging.getLogger(__name__)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class ModelConfig:
    """Size of the base model (defaults: 4 layers, hidden 128, two 64-wide heads, ~0.8 M parameters)."""

    hidden: int = 128
    layers: int = 4
    heads: int = 2
    kv_heads: int = 1
    intermediate: int = 256
    vocab_size: int = 264  # the tokenizer's 259 tokens, rounded up to a multiple of 8

    def llama(self):
        from transformers import LlamaConfig

        if self.hidden % self.heads or self.hidden // self.heads not in (32, 64, 80, 96, 112, 128):
            raise ValueError(f"head size {self.hidden}/{self.heads} is not one vLLM's CPU attention accepts")
        return LlamaConfig(hidden_size=self.hidden, intermediate_size=self.intermediate,
                           num_hidden_layers=self.layers, num_attention_heads=self.heads,
                           num_key_value_heads=self.kv_heads, vocab_size=self.vocab_size,
                           max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=0,
                           eos_token_id=1, pad_token_id=2, rope_theta=10000.0)


@dataclass
class TrainConfig:
    """One training run: steps, batch size, peak learning rate (warm-up then cosine decay)."""

    steps: int
    batch_size: int
    lr: float
    warmup: int = 50
    weight_decay: float = 0.0
    log_every: int = 100


@dataclass
class LoraConfig:
    """PEFT LoRA settings of every adapter of the zoo."""

    rank: int = 8
    alpha: int = 16
    targets: tuple[str, ...] = field(default_factory=lambda: LORA_TARGETS)


def _schedule(cfg: TrainConfig):
    def factor(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def fit(model, encoded: list, cfg: TrainConfig, seed: int, what: str) -> list[float]:
    """Train the parameters of ``model`` that require grad with AdamW on ``encoded`` examples
    (``data.encode_examples`` output); returns the loss of every step."""
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg))
    model.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    for step, batch in enumerate(batches(encoded, cfg.batch_size, cfg.steps, seed)):
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            recent = losses[-cfg.log_every:]
            logger.info("%s step %d/%d loss %.4f (%.1f s)", what, step + 1, cfg.steps, sum(recent) / len(recent),
                        time.perf_counter() - t0)
    model.eval()
    return losses


def new_base_model(cfg: ModelConfig, seed: int):
    """A randomly initialised float32 ``LlamaForCausalLM`` of size ``cfg``."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg.llama()).float()


def train_base(cfg: ModelConfig, encoded: list, train: TrainConfig, seed: int):
    """Pre-train a base model from scratch on the task mixture; returns ``(model, losses)``."""
    model = new_base_model(cfg, seed)
    logger.info("base model: %.2f M parameters", sum(p.numel() for p in model.parameters()) / 1e6)
    return model, fit(model, encoded, train, seed, "base")


def train_lora(base, encoded: list, lora: LoraConfig, train: TrainConfig, seed: int, what: str):
    """Wrap ``base`` (left unchanged) in a fresh PEFT LoRA and train it on ``encoded``;
    returns ``(peft_model, losses)``. Call ``peft_model.unload()`` to get ``base`` back clean."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    torch.manual_seed(seed)
    config = PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=list(lora.targets), lora_dropout=0.0,
                            bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    with torch.no_grad():  # PEFT starts B at zero; a small random B lets A and B both move from step one
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 1e-3)
    return model, fit(model, encoded, train, seed, what)


def config_dict(*configs) -> dict:
    """The dataclass configs as one JSON-ready dict, keyed by class name."""
    return {type(c).__name__: asdict(c) for c in configs}
