"""Read PEFT LoRA adapters lazily (``peft_write`` writes them).

A PEFT adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or
``adapter_model.bin``). Tensor keys look like
``base_model.model.<module>.lora_A.weight`` (r × d_in) and ``...lora_B.weight`` (d_out × r).
Only headers are read when an adapter is opened; ``factors(module)`` reads one module's
tensors, so compression holds one module of all adapters in memory, never a whole collection.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from vllm_jd.store.errors import AdapterError
from vllm_jd.store.names import name_problem

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>A|B)(?:\.(?P<adapter>[^.]+))?\.weight$")


@dataclass(frozen=True)
class ModuleSpec:
    """One target module of one adapter: tensor keys, rank r, dims, and scale s."""

    a_key: str
    b_key: str
    rank: int
    d_in: int
    d_out: int
    scale: float


@dataclass
class PeftAdapter:
    """A PEFT LoRA adapter opened lazily (headers only)."""

    name: str
    path: Path
    config: dict
    weights: Path
    modules: dict[str, ModuleSpec] = field(default_factory=dict)
    _bin_state: dict | None = None
    source: str | None = None
    """What a store records as where the adapter came from (None: ``path``, absolute)."""

    @property
    def lora_params(self) -> int:
        """Parameters of the uncompressed adapter: Σ_m r_m (d_in + d_out)."""
        return sum(s.rank * (s.d_in + s.d_out) for s in self.modules.values())

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def factors(self, module: str, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(A, Bt)`` for ``module`` in float32 with the scale folded into ``Bt``.

        A: [r, d_in]; Bt: [r, d_out] with ``Bt = s · Bᵀ``, so ``P = Btᵀ A``.
        Raises AdapterError on NaN/Inf values and on an update too large to serve (``check_update``);
        ``check=False`` leaves that to the caller (``factors.load_module`` checks a whole module at once).
        """
        a, b = self.raw_factors(module, check)
        return a, (b.T * self.modules[module].scale).contiguous()

    def raw_factors(self, module: str, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lora_A [r, d_in], lora_B [d_out, r])`` as stored (scale not applied), float32.

        Raises AdapterError on NaN/Inf values and on an update too large to serve (``check_update``).
        """
        spec = self.modules[module]
        if self.weights.name == BIN_NAME:
            if self._bin_state is None:
                self._bin_state = _load_bin(self)
            a, b = self._bin_state[spec.a_key], self._bin_state[spec.b_key]
        else:
            with safe_open(str(self.weights), framework="pt") as f:
                a, b = f.get_tensor(spec.a_key), f.get_tensor(spec.b_key)
        a, b = a.to(torch.float32), b.to(torch.float32)
        if not check:
            return a, b
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterError(self.name, f"module '{module}' has NaN or Inf weights", self.path)
        check_update(self.name, module, a, b.T * spec.scale, self.path)
        return a, b

    def checksum(self) -> str:
        """sha256 of the config file and the weights file, streamed."""
        h = hashlib.sha256()
        for p in (self.path / CONFIG_NAME, self.weights):
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        return "sha256:" + h.hexdigest()


MAX_UPDATE_NORM = 65504.0
"""Largest ‖s·B·A‖_F accepted per module: fp16's largest value. Every number a store keeps for
the adapter (Σ_i entries ≤ ‖P_i‖_F with orthonormal bases, the entries of P_i itself) then fits
the narrowest serving dtype; trained adapters sit many orders of magnitude below. Above it the
adapter overflows when served (and once produced NaN errors that made a store unreadable)."""


def check_update(name: str, module: str, a: torch.Tensor, bt: torch.Tensor, path: object = None) -> None:
    """AdapterError unless ``P = btᵀ a`` (a [r, d_in], bt [r, d_out]) is finite with ‖P‖_F ≤
    ``MAX_UPDATE_NORM``; computed in float64 from the factors (r×r Gram matrices), which cannot
    overflow where float32 products of 1e19-sized weights do."""
    a64, b64 = a.double(), bt.double()
    norm = float(((b64 @ b64.T) * (a64 @ a64.T)).sum().clamp_min(0).sqrt())
    if not norm <= MAX_UPDATE_NORM:  # also catches NaN and Inf
        raise AdapterError(name, f"module '{module}': the update s·B·A has norm {norm:.3g}, above {MAX_UPDATE_NORM:g} "
                                 "(fp16's largest value): it would overflow when served", path)


def recorded_source(adapter) -> str:
    """The source a store records for ``adapter``: absolute, so ``compress --from-store`` run from
    another folder still finds it."""
    src = getattr(adapter, "source", None)
    return src if src is not None else str(Path(adapter.path).absolute())


def discover(paths: list[str | Path]) -> list[tuple[str, Path]]:
    """Expand ``paths`` into ``(name, folder)`` pairs; a path is an adapter or a folder of them.

    The adapter's name is its folder name. Raises ValueError on a missing path, a folder with
    no adapter, duplicate names, or an empty list.
    """
    found: list[tuple[str, Path]] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise AdapterError(p.name, "path does not exist", p)
        if not p.is_dir():
            raise AdapterError(p.name, f"is not a folder (expected a PEFT adapter folder with {CONFIG_NAME})", p)
        if (p / CONFIG_NAME).exists():
            found.append((p.name, p))
            continue
        _refuse_weights_without_config(p)
        subs = sorted(q for q in p.iterdir() if q.is_dir() and (q / CONFIG_NAME).exists())
        adapters = set(subs)  # a set: `in` over the list was quadratic (0.3 s at 1,000 adapters)
        for q in sorted(q for q in p.iterdir() if q.is_dir() and q not in adapters):
            _refuse_weights_without_config(q)  # a broken adapter is an error, never silently skipped
        if not subs:
            raise AdapterError(p.name, f"no {CONFIG_NAME} in the folder or its subfolders", p)
        found.extend((q.name, q) for q in subs)
    if not found:
        raise ValueError("no adapters given: pass at least one PEFT adapter folder")
    seen: dict[str, Path] = {}
    for name, p in found:
        if (why := name_problem(name)) is not None:  # the folder name becomes the adapter's name
            raise AdapterError(name[:80], why, p)
        if name in seen:
            raise AdapterError(name, f"duplicate adapter name: both {seen[name]} and {p}", p)
        seen[name] = p
    return found


def _refuse_weights_without_config(p: Path) -> None:
    if (p / SAFETENSORS_NAME).exists() or (p / BIN_NAME).exists():
        raise AdapterError(p.name, f"missing {CONFIG_NAME}", p)


def open_adapter(name: str, path: Path) -> PeftAdapter:
    """Read the config and tensor headers of one adapter and validate them (no weights read)."""
    _refuse_special(name, path, path / CONFIG_NAME)
    config = _read_config(name, path)
    weights = path / SAFETENSORS_NAME
    if not weights.exists():
        weights = path / BIN_NAME
        if not weights.exists():
            raise AdapterError(name, f"missing {SAFETENSORS_NAME} (or {BIN_NAME})", path)
    _refuse_special(name, path, weights)
    adapter = PeftAdapter(name=name, path=path, config=config, weights=weights)
    shapes = _read_shapes(adapter)
    adapter.modules = _module_specs(adapter, shapes)
    return adapter


def _refuse_special(name: str, path: Path, f: Path) -> None:
    """AdapterError if ``f`` exists and is not a regular file: reading a FIFO or a device would
    block or never end (a recorded source can be swapped for one between compressions)."""
    try:
        mode = f.stat().st_mode
    except OSError:
        return  # absent: the reader says so
    if not stat.S_ISREG(mode):
        raise AdapterError(name, f"{f.name} is not a regular file (a FIFO, device or folder cannot be read)", path)


def _read_config(name: str, path: Path) -> dict:
    cfg_path = path / CONFIG_NAME
    try:
        config = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise AdapterError(name, f"missing {CONFIG_NAME}", path) from None
    except (OSError, UnicodeDecodeError) as e:
        raise AdapterError(name, f"cannot read {CONFIG_NAME}: {e}", path) from None
    except json.JSONDecodeError as e:
        raise AdapterError(name, f"invalid JSON in {CONFIG_NAME}: {e}", path) from None
    if not isinstance(config, dict):
        raise AdapterError(name, f"{CONFIG_NAME} is not a JSON object", path)
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterError(name, f"unsupported PEFT type {peft_type!r}: only LORA adapters can be compressed", path)
    if config.get("use_dora"):
        raise AdapterError(name, "DoRA adapters (use_dora=true) are not supported: the magnitude vector is not a low-rank update", path)
    if config.get("bias", "none") not in ("none", None) or config.get("lora_bias"):
        raise AdapterError(name, f"trained biases (bias={config.get('bias')!r}, lora_bias={config.get('lora_bias')!r}) are not supported", path)
    if config.get("modules_to_save"):
        raise AdapterError(name, f"modules_to_save {config['modules_to_save']} are full weights, not LoRA factors: not supported", path)
    for key in ("r", "lora_alpha"):
        v = config.get(key)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
            raise AdapterError(name, f"{CONFIG_NAME}: '{key}' must be a positive number, got {v!r}", path)
    return config


def _read_shapes(adapter: PeftAdapter) -> dict[str, tuple[int, ...]]:
    try:
        if adapter.weights.name == BIN_NAME:
            adapter._bin_state = _load_bin(adapter)
            return {k: tuple(v.shape) for k, v in adapter._bin_state.items()}
        with safe_open(str(adapter.weights), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except AdapterError:
        raise
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise AdapterError(adapter.name, f"cannot read {adapter.weights.name}: {e}", adapter.path) from None


def _load_bin(adapter: PeftAdapter) -> dict:
    try:
        # mmap keeps a .bin adapter out of RAM until a module's tensors are used
        state = torch.load(adapter.weights, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise AdapterError(adapter.name, f"cannot read {BIN_NAME}: {e}", adapter.path) from None
    if not isinstance(state, dict):
        raise AdapterError(adapter.name, f"{BIN_NAME} does not hold a state dict", adapter.path)
    return state


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern/alpha_pattern rule: the first key matching the end of the name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _module_specs(adapter: PeftAdapter, shapes: dict[str, tuple[int, ...]]) -> dict[str, ModuleSpec]:
    name, path, cfg = adapter.name, adapter.path, adapter.config
    pairs: dict[str, dict[str, str]] = {}
    for key in shapes:
        if "lora_embedding" in key:
            raise AdapterError(name, f"embedding LoRA ({key}) is not supported", path)
        if "lora_magnitude_vector" in key:
            raise AdapterError(name, f"DoRA weights ({key}) are not supported", path)
        m = _KEY.match(key)
        if m is None:
            raise AdapterError(name, f"unexpected tensor '{key}': only lora_A/lora_B weights are supported", path)
        pairs.setdefault(m["module"], {})[m["which"]] = key
    if not pairs:
        raise AdapterError(name, "holds no LoRA weights", path)
    specs: dict[str, ModuleSpec] = {}
    for module, keys in sorted(pairs.items()):
        if set(keys) != {"A", "B"}:
            missing = "lora_B" if "A" in keys else "lora_A"
            raise AdapterError(name, f"module '{module}' has no {missing} weight", path)
        sa, sb = shapes[keys["A"]], shapes[keys["B"]]
        if len(sa) != 2 or len(sb) != 2:
            raise AdapterError(name, f"module '{module}': LoRA weights must be 2-D (Conv LoRA is not supported), got {sa} and {sb}", path)
        r = int(_pattern_value(cfg.get("rank_pattern"), module, cfg["r"]))
        if sa[0] != r or sb[1] != r:
            raise AdapterError(name, f"module '{module}': lora_A {sa} and lora_B {sb} disagree with rank r={r}", path)
        if r > min(sa[1], sb[0]):
            raise AdapterError(name, f"module '{module}': rank {r} is larger than the module's dimension {min(sa[1], sb[0])}", path)
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), module, cfg["lora_alpha"]))
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        specs[module] = ModuleSpec(keys["A"], keys["B"], r, d_in=sa[1], d_out=sb[0], scale=scale)
    return specs
