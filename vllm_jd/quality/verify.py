"""``vllm-jd verify``: how close each stored adapter serves to its original.

For every adapter (or those named), on the same prompts: the original (its recorded source, read
again and checked against its recorded checksum) generates greedily; then both the original and
the stored adapter (exported, which is exactly what is served: the parity tests check served
tokens against the export) score that output teacher-forced. Reported per adapter:

- agreement: the fraction of those tokens the stored adapter also ranks first (1.0 = it would
  generate the same text);
- kl: mean per-token KL(original ‖ stored) of the next-token distributions, in nats;
- the stored reconstruction error, next to them.

transformers + PEFT run both, one adapter pair at a time on one loaded base model (memory stays
bounded), float32 by default so a KL of 1e-6 is a measurement, not rounding.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vllm_jd.compress.export import export
from vllm_jd.compress.peft_io import open_adapter
from vllm_jd.quality.prompts import PromptSet
from vllm_jd.sources.fetch import fetch_one
from vllm_jd.sources.spec import parse_source
from vllm_jd.store.errors import AdapterError
from vllm_jd.store.format import Manifest, read_manifest


@dataclass
class AdapterQuality:
    name: str
    kind: str
    error: float
    agreement: float
    kl: float
    tokens: int
    original: Path = field(repr=False)
    """Where the original was read (``repair`` stores it from there)."""

    def passes(self, threshold: float) -> bool:
        return self.tokens > 0 and self.agreement >= threshold  # no token scored is no evidence

    def as_dict(self) -> dict:
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "original"}
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in values.items()}


def original_folder(manifest: Manifest, name: str) -> Path:
    """The local folder of adapter ``name``'s recorded source (fetched again if remote), checked
    against the recorded checksum. ValueError naming the adapter when it is gone or changed."""
    info = manifest.adapters[name]
    try:
        source = parse_source(info.source)
        folder = source.path if source.kind == "local" else fetch_one(source)[0].folder
        if not Path(folder).is_dir():
            raise AdapterError(name, "its recorded source no longer exists (verify compares against the original)",
                               info.source)
        if open_adapter(name, Path(folder)).checksum() != info.checksum:
            raise AdapterError(name, "its recorded source changed since it was stored", info.source)
    except AdapterError:
        raise
    except ValueError as e:
        raise AdapterError(name, f"its recorded source cannot be read: {e}", info.source) from None
    return Path(folder)


def original_folders(manifest: Manifest, names: Sequence[str]) -> dict[str, Path]:
    """``original_folder`` of every adapter named. ValueError listing every adapter whose original
    is gone or changed, not just the first: with 1,000 adapters, one run shows them all."""
    folders, problems = {}, []
    for n in names:
        try:
            folders[n] = original_folder(manifest, n)
        except AdapterError as e:
            problems.append(e)
    if len(problems) == 1:
        raise problems[0]
    if problems:
        more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise ValueError(f"{len(problems)} adapters cannot be verified: {'; '.join(map(str, problems[:3]))}{more}")
    return folders


class Scorer:
    """One base model and tokenizer; ``score`` one (original, stored) adapter pair. The model is
    read at the first ``score`` (so a Scorer shared by verify → repair → verify reads it once, and
    a run whose inputs are refused never reads it)."""

    def __init__(self, model: str, device: str = "cpu", dtype: torch.dtype = torch.float32, progress: bool = True):
        self.model, self.device, self.dtype, self.progress = model, device, dtype, progress
        self.tok = self.base = None

    def _load(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        if not self.progress:  # -q: not even transformers' weight-loading bar
            hf_logging.disable_progress_bar()
        self.tok = AutoTokenizer.from_pretrained(self.model)
        self.base = AutoModelForCausalLM.from_pretrained(self.model, dtype=self.dtype).to(self.device).eval()

    @torch.no_grad()
    def score(self, original: Path, stored: Path, prompts: Sequence[str], max_tokens: int) -> tuple[float, float, int]:
        """(agreement, mean KL, tokens scored) of ``stored`` against ``original`` (see module)."""
        from peft import PeftModel

        if self.base is None:
            self._load()
        pm = PeftModel.from_pretrained(self.base, str(original), adapter_name="original")
        try:
            pm.load_adapter(str(stored), adapter_name="stored")
            agree, kl, n = 0, 0.0, 0
            for prompt in prompts:
                ids = self.tok(prompt, return_tensors="pt").input_ids.to(self.device)
                pm.set_adapter("original")
                full = pm.generate(ids, max_new_tokens=max_tokens, do_sample=False,
                                   pad_token_id=self.tok.pad_token_id or self.tok.eos_token_id)[0]
                out = full[ids.shape[1]:]
                if out.numel() == 0:
                    continue
                lo = self._log_probs(pm, full, ids.shape[1], out.numel())
                pm.set_adapter("stored")
                ls = self._log_probs(pm, full, ids.shape[1], out.numel())
                agree += int((ls.argmax(-1) == out).sum())
                kl += float((lo.exp() * (lo - ls)).sum(-1).clamp_min(0).sum())
                n += out.numel()
        finally:
            self.base = pm.unload()  # the LoRA layers out again: the next pair starts from the bare base
        return (agree / n if n else 1.0), (kl / n if n else 0.0), n

    @staticmethod
    def _log_probs(pm, full: torch.Tensor, n_prompt: int, n_out: int) -> torch.Tensor:
        logits = pm(full[None]).logits[0, n_prompt - 1:n_prompt - 1 + n_out].float()
        return logits.log_softmax(-1)


def check_model_folder(model: str) -> None:
    """A ``--model`` that names a local path must be a model folder (a Hub id is left to the Hub);
    one line instead of transformers' guesses at a repo id or tokenizer backend."""
    path = Path(model).expanduser()
    if model.startswith(("/", "./", "../", "~")) or path.exists():
        if not path.is_dir():
            raise ValueError(f"--model {model}: no such folder")
        if not (path / "config.json").is_file():
            raise ValueError(f"--model {model}: not a model folder (no config.json)")
        if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
            raise ValueError(f"--model {model}: no tokenizer in it (tokenizer.json, tokenizer.model or "
                             "tokenizer_config.json): verify generates text")


def verify(store: str | Path, model: str, prompts: PromptSet | Sequence[str], names: Sequence[str] | None = None,
           max_tokens: int = 32, device: str = "cpu", progress: bool = True,
           scorer: Scorer | None = None) -> list[AdapterQuality]:
    """``AdapterQuality`` of each adapter ``names`` (default: all) of ``store``, on its prompts
    (``PromptSet.for_adapter``; a plain list: the same for all). Every input is checked before any
    scoring: ValueError on an unknown name (asked for, or named in the prompts), a missing or
    changed source, a model whose modules are not the store's, an adapter without prompts,
    ``max_tokens`` < 1. ``scorer``: one to reuse (its model must be ``model``)."""
    from vllm_jd.serving.preflight import check

    store = Path(store)
    manifest = read_manifest(store)
    names = list(manifest.adapters) if names is None else list(dict.fromkeys(names))
    if unknown := [n for n in names if n not in manifest.adapters]:
        raise ValueError(f"not in {store}: {', '.join(unknown[:5])}")
    prompts = prompts if isinstance(prompts, PromptSet) else PromptSet(list(prompts))
    if unknown := [n for n in prompts.own if n not in manifest.adapters]:
        raise ValueError(f"the prompts name adapters not in {store}: {', '.join(unknown[:5])}")
    if without := [n for n in names if not prompts.for_adapter(n)]:
        raise ValueError(f"no prompts for {len(without)} adapter(s), e.g. {', '.join(without[:5])}: give shared "
                         f"prompts (lines without \"adapters\") or prompts naming them")
    if max_tokens < 1:
        raise ValueError("verify needs --max-tokens ≥ 1")
    check_model_folder(model)
    check(model, {m.name: (m.d_in, m.d_out) for m in manifest.modules})
    originals = original_folders(manifest, names)
    scorer = scorer or Scorer(model, device, progress=progress)
    out = []
    with tempfile.TemporaryDirectory(prefix="vllm-jd-verify-") as tmp:
        for i, n in enumerate(tqdm(names, desc="verify", unit="adapter", disable=not progress)):
            stored = export(store, n, Path(tmp) / f"a{i}")
            agreement, kl, tokens = scorer.score(originals[n], stored, prompts.for_adapter(n), max_tokens)
            info = manifest.adapters[n]
            out.append(AdapterQuality(n, manifest.clusters[info.cluster].kind, info.error, agreement, kl, tokens,
                                      originals[n]))
    return out


def format_table(results: Sequence[AdapterQuality], threshold: float) -> str:
    """One line per adapter, worst agreement first, then a summary line."""
    rows = [f"{'adapter':<32} {'kind':<7} {'error':>7} {'agreement':>9} {'kl':>10}"]
    for r in sorted(results, key=lambda r: (r.agreement, -r.kl)):
        flag = "" if r.passes(threshold) else "  below threshold"
        rows.append(f"{r.name[:32]:<32} {r.kind:<7} {r.error:>7.4f} {r.agreement:>9.4f} {r.kl:>10.2e}{flag}")
    below = sum(not r.passes(threshold) for r in results)
    rows.append(f"{len(results)} adapters, {below} below agreement {threshold}")
    return "\n".join(rows)
