"""The on-disk store: ``manifest.json`` plus immutable safetensors shards.

(Over ~300 lines on purpose: the format's whole definition, models, keys and reads, in one file
that users' tools can read without the rest of vllm-jd.)

Layout::

    STORE/manifest.json              format version, method, modules, clusters, adapters, weight map
    STORE/tensors/<shard>.safetensors

Tensor keys (the manifest's ``weight_map`` says which shard holds each, like HF's sharded
checkpoints):

    U.<cluster>.<module>             [d_out, r_c]  in the manifest's basis_dtype
    V.<cluster>.<module>             [d_in, r_c]   in the manifest's basis_dtype
    sigma.<cluster>.<block>.<module> [k, r_c, r_c] (sigma "full") or [k, r_c] ("diag"), sigma_dtype
    <key>.scale                      float32 per-channel scales of an int8 tensor (``quantize``)

Adapter ``name`` reads row ``row`` of ``sigma.<cluster>.<block>.*``. Shards are never
rewritten: ``compress`` writes one shard per module; ``add`` writes one new shard with new Σ
blocks (and singleton bases); either then replaces the manifest atomically (``transaction``), so
a reader always sees a complete store and a failed command leaves it byte-for-byte unchanged.

Reading is tolerant where it can be: an adapter entry that fails its check is set aside (not
served, reported by ``inspect``/``fsck``, written back unchanged), so one bad entry never makes
the whole store unreadable; a malformed top level still does.
"""

from __future__ import annotations

import json
import math
import os
import stat
import uuid
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator
from safetensors import safe_open

from vllm_jd.store.dtypes import SCALE_SUFFIX, StoreDtype, decode
from vllm_jd.store.errors import StoreError
from vllm_jd.store.names import name_problem
from vllm_jd.store.ternary_codec import decode_bases

FORMAT = "vllm-jd-store"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # v2 added basis_dtype / sigma_dtype (v1 stores are all float32)
MANIFEST = "manifest.json"


class ModuleInfo(BaseModel):
    model_config = ConfigDict(extra="allow")  # fields of a newer vllm-jd survive our writes

    name: str = Field(description="Module path without the PEFT prefix, e.g. model.layers.0.self_attn.q_proj")
    d_in: int
    d_out: int


class CompeftInfo(BaseModel):
    """How a ``compeft`` singleton's U_c = B′, V_c = A′ᵀ are encoded in tensor ``compeft.<cluster>``."""

    model_config = ConfigDict(extra="allow")

    encoding: Literal["golomb", "masks"]
    density: float
    alpha: float
    d: int = Field(description="Entries of the adapter's flat task vector (all raw A and B)")
    bits: int = Field(description="Payload bits (the paper's count: positions/masks + signs + 16-bit scale)")
    ranks: dict[str, int] = Field(description="LoRA rank r_m of each module the adapter has")


class ClusterInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: int
    rank: int = Field(description="Rank r_c of this cluster's U_c, V_c and Σ_i")
    kind: Literal["shared", "exact", "svd", "compeft"] = Field(
        description="shared: a JD basis; exact: one adapter stored losslessly; svd: one adapter truncated; "
                    "compeft: one adapter's raw factors sparse-ternary coded (ComPEFT), Σ_i = LoRA scale")
    compeft: CompeftInfo | None = None


class AdapterInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    cluster: int
    block: int = Field(description="Σ block this adapter's row lives in (0 = written by compress)")
    row: int
    rank: int = Field(description="Largest LoRA rank r_i of the source adapter")
    lora_params: int = Field(description="Parameters of the source adapter: Σ_m r_i,m (d_in + d_out)")
    checksum: str
    source: str
    error: float = Field(description="Aggregate relative error over modules (of the stored, possibly quantised, tensors)")
    error_fp32: float | None = Field(None, description="The same error before quantisation (None: stored as computed)")
    module_errors: list[float | None] = Field(description="Relative error per module; None = no such module")

    @field_validator("cluster", "block", "row", "rank", "lora_params")
    @classmethod
    def _non_negative(cls, v: int, info) -> int:
        if v < 0:
            raise ValueError(f"{info.field_name} {v} is negative")
        return v

    @field_validator("error", "error_fp32")
    @classmethod
    def _finite_error(cls, v: float | None, info) -> float | None:
        # a NaN error was once written as null and made the whole manifest unreadable
        if v is not None and not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{info.field_name} {v} is not a finite number ≥ 0")
        return v

    @field_validator("module_errors")
    @classmethod
    def _finite_module_errors(cls, v: list[float | None]) -> list[float | None]:
        bad = [e for e in v if e is not None and not (math.isfinite(e) and e >= 0)]
        if bad:
            raise ValueError(f"module error {bad[0]} is not a finite number ≥ 0")
        return v


class Manifest(BaseModel):
    model_config = ConfigDict(extra="allow")

    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    method: Literal["jd-full", "jd-diag", "svd", "compeft"]
    sigma: Literal["full", "diag"]
    rank: int
    basis_dtype: StoreDtype = Field("fp32", description="dtype U_c and V_c are stored in")
    sigma_dtype: StoreDtype = Field("fp32", description="dtype Σ_i are stored in")
    base_model: str | None = None
    settings: dict = Field(default_factory=dict)
    modules: list[ModuleInfo]
    clusters: list[ClusterInfo]
    adapters: dict[str, AdapterInfo]
    weight_map: dict[str, str] = Field(default_factory=dict)
    next_block: int = 1
    generation: str = Field("", description="Id of this store version: new at every compress, kept by add")
    quarantined: dict[str, dict] = Field(
        default_factory=dict, description="Entries set aside by `fsck --repair`: name → {entry: the adapter's "
                                          "manifest entry as found, reason}; never served, never lost")
    _broken: dict[str, tuple[dict, str]] = PrivateAttr(default_factory=dict)
    """Adapter entries that failed their check on read: name → (raw entry, reason). Not served,
    written back unchanged by ``write_manifest`` until ``fsck --repair`` quarantines them."""

    def module_index(self) -> dict[str, int]:
        return {m.name: i for i, m in enumerate(self.modules)}

    @property
    def broken(self) -> dict[str, str]:
        """Adapters whose manifest entry is unusable: name → reason."""
        return {n: why for n, (_, why) in self._broken.items()}

    def set_aside(self, name: str, reason: str) -> None:
        """Stop serving adapter ``name`` (a problem found in its tensors); its entry stays in the file."""
        info = self.adapters.pop(name)
        self._broken[name] = (info.model_dump(mode="json"), reason)


def u_key(cluster: int, module: str) -> str:
    return f"U.{cluster}.{module}"


def v_key(cluster: int, module: str) -> str:
    return f"V.{cluster}.{module}"


def sigma_key(cluster: int, block: int, module: str) -> str:
    return f"sigma.{cluster}.{block}.{module}"


def compeft_key(cluster: int) -> str:
    return f"compeft.{cluster}"


def read_manifest(store: Path) -> Manifest:
    """Load and check ``STORE/manifest.json``; raises StoreError on anything unexpected."""
    path = Path(store) / MANIFEST
    if not path.exists():
        raise StoreError(f"{store} is not a vllm-jd store: no {MANIFEST}")
    try:
        raw = json.loads(path.read_text(), object_pairs_hook=_no_duplicate_keys)
    except (OSError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise StoreError(f"cannot read {path}: {str(e)[:300]}") from None
    if not isinstance(raw, dict):
        raise StoreError(f"{path}: malformed manifest: not a JSON object")
    if (where := _non_finite({k: v for k, v in raw.items() if k != "adapters"})) is not None:
        raise StoreError(f"{path}: malformed manifest: a non-finite number at {where}")
    if raw.get("format") != FORMAT:
        raise StoreError(f"{path}: not a vllm-jd store (format={raw.get('format')!r})")
    if raw.get("format_version") not in READABLE_VERSIONS:
        raise StoreError(f"{path}: store format version {raw.get('format_version')} is not supported "
                         f"(this vllm-jd reads versions {', '.join(map(str, READABLE_VERSIONS))})")
    adapters = raw.get("adapters")
    if not isinstance(adapters, dict):
        raise StoreError(f"{path}: malformed manifest: 'adapters' is not an object")
    try:
        manifest = Manifest.model_validate({**raw, "adapters": {}})
    except ValidationError as e:
        raise StoreError(f"{path}: malformed manifest: {_one_line(e)}") from None
    for name, entry in adapters.items():  # one bad entry sets that adapter aside, never the store
        try:
            manifest.adapters[name] = _checked_entry(manifest, name, entry)
        except ValidationError as e:
            manifest._broken[name] = (_json_safe(entry), _one_line(e))
        except ValueError as e:
            manifest._broken[name] = (_json_safe(entry), str(e))
    return manifest


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    """json's object hook: a key given twice is an error (json keeps the last one silently)."""
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"the key {k[:80]!r} appears twice in one object")
        out[k] = v
    return out


def _non_finite(x, where: str = "") -> str | None:
    """The path of the first NaN/Inf in ``x`` (json.loads accepts bare NaN), or None."""
    if isinstance(x, float) and not math.isfinite(x):
        return where or "the top level"
    items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, list) else ()
    for k, v in items:
        if (found := _non_finite(v, f"{where}.{k}" if where else str(k))) is not None:
            return found
    return None


def _one_line(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, err['loc'])) or 'entry'}: {err['msg']}" for err in e.errors())[:500]


def _json_safe(x):
    """``x`` with every non-finite float turned into its name: JSON has no NaN, and an entry set
    aside must be writable back as it was (json.loads accepts a bare NaN; json.dump must not)."""
    if isinstance(x, float) and not math.isfinite(x):
        return repr(x)
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


def _checked_entry(manifest: Manifest, name: str, entry: object) -> AdapterInfo:
    """One adapter's manifest entry, checked against the rest of the manifest; ValueError why not."""
    if (why := name_problem(name)) is not None:
        raise ValueError(why)
    info = AdapterInfo.model_validate(entry)
    if info.cluster >= len(manifest.clusters):
        raise ValueError(f"cluster {info.cluster} does not exist (the store has {len(manifest.clusters)})")
    if info.block >= manifest.next_block:
        raise ValueError(f"Σ block {info.block} was never written (next block is {manifest.next_block})")
    if len(info.module_errors) != len(manifest.modules):
        raise ValueError(f"{len(info.module_errors)} module errors for {len(manifest.modules)} modules")
    return info


def write_manifest(store: Path, manifest: Manifest) -> None:
    """Replace ``STORE/manifest.json`` atomically (write, fsync, rename). Entries set aside on read
    are written back as they were found: a write never loses an adapter. A non-finite number
    anywhere raises ValueError and nothing is written (JSON has no NaN; it once became null)."""
    raw = manifest.model_dump(mode="json")
    raw["adapters"].update({n: entry for n, (entry, _) in manifest._broken.items() if n not in manifest.adapters})
    tmp = Path(store) / f".{MANIFEST}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "w") as f:
        json.dump(raw, f, indent=1, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, Path(store) / MANIFEST)


class TensorReader:
    """Read store tensors by key, keeping shards open (safetensors mmaps them)."""

    def __init__(self, store: Path, manifest: Manifest):
        self.store, self.manifest, self._open = Path(store), manifest, {}
        self._decoded: tuple[int, dict] | None = None  # the last ComPEFT cluster decoded

    def _compeft_basis(self, key: str) -> tuple[int, str, str] | None:
        """(cluster, "U"/"V", module) if ``key`` is a basis of a ComPEFT-coded cluster, else None."""
        which, _, rest = key.partition(".")
        cid, _, module = rest.partition(".")
        if which not in ("U", "V") or not cid.isdigit() or int(cid) >= len(self.manifest.clusters):
            return None
        info = self.manifest.clusters[int(cid)].compeft
        return (int(cid), which, module) if info is not None and module in info.ranks else None

    def has(self, key: str) -> bool:
        return key in self.manifest.weight_map or self._compeft_basis(key) is not None

    def get(self, key: str) -> torch.Tensor:
        """The float32 value of tensor ``key`` (int8 tensors dequantised with their scales,
        ComPEFT-coded bases decoded)."""
        if key not in self.manifest.weight_map and (cb := self._compeft_basis(key)) is not None:
            cid, which, module = cb
            if self._decoded is None or self._decoded[0] != cid:
                dims = {m.name: (m.d_in, m.d_out) for m in self.manifest.modules}
                c = self.manifest.clusters[cid]
                self._decoded = cid, decode_bases(self._raw(compeft_key(cid)), c.compeft, dims, c.rank)
            U, V = self._decoded[1][module]
            return U if which == "U" else V
        x = self._raw(key)
        return decode(x, self._raw(key + SCALE_SUFFIX) if x.dtype == torch.int8 else None)

    def stored(self, key: str) -> torch.Tensor:
        """Tensor ``key`` exactly as stored: int8 values without their scales, ComPEFT payload bytes
        (``compact`` copies tensors this way, bit for bit)."""
        return self._raw(key)

    def _raw(self, key: str) -> torch.Tensor:
        shard = self.manifest.weight_map.get(key)
        if shard is None:
            raise StoreError(f"{self.store}: tensor {key} is not in the weight map")
        if shard not in self._open:
            path = shard_path(self.store, shard)
            try:
                self._open[shard] = safe_open(str(path), framework="pt")
            except Exception as e:
                raise StoreError(f"{self.store}: cannot open shard {shard}: {e}") from None
        try:
            return self._open[shard].get_tensor(key)
        except Exception as e:  # a truncated or corrupt shard
            raise StoreError(f"{self.store}: cannot read tensor {key} from {shard}: {e}") from None

    def sigma(self, name: str, module: str) -> torch.Tensor:
        """Σ of adapter ``name`` for ``module``: [r_c, r_c] (full) or [r_c] (diag)."""
        a = self.manifest.adapters[name]
        return self.get(sigma_key(a.cluster, a.block, module))[a.row]


def shard_path(store: Path, shard: str) -> Path:
    """The file of weight-map entry ``shard``: StoreError unless it is ``tensors/<file>`` and a
    regular file inside the store (a tampered manifest must not make us open anything else)."""
    parts = shard.split("/")
    if len(parts) != 2 or parts[0] != "tensors" or parts[1] in ("", ".", "..") or "\\" in shard:
        raise StoreError(f"{store}: shard path {shard!r} is not tensors/<file> inside the store")
    path = Path(store) / shard
    try:
        st = os.lstat(path)
    except OSError as e:
        raise StoreError(f"{store}: shard {shard} is missing: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise StoreError(f"{store}: shard {shard} is not a regular file")
    return path
