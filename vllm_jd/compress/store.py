"""The on-disk store: ``manifest.json`` plus immutable safetensors shards.

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
blocks (and singleton bases) and then replaces the manifest atomically, so a reader always sees
a complete store and a failed command leaves it byte-for-byte unchanged.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Literal

import torch
from pydantic import BaseModel, Field
from safetensors import safe_open

from vllm_jd.compress.errors import StoreError
from vllm_jd.compress.quantize import SCALE_SUFFIX, StoreDtype, decode

FORMAT = "vllm-jd-store"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # v2 added basis_dtype / sigma_dtype (v1 stores are all float32)
MANIFEST = "manifest.json"


class ModuleInfo(BaseModel):
    name: str = Field(description="Module path without the PEFT prefix, e.g. model.layers.0.self_attn.q_proj")
    d_in: int
    d_out: int


class CompeftInfo(BaseModel):
    """How a ``compeft`` singleton's U_c = B′, V_c = A′ᵀ are encoded in tensor ``compeft.<cluster>``."""

    encoding: Literal["golomb", "masks"]
    density: float
    alpha: float
    d: int = Field(description="Entries of the adapter's flat task vector (all raw A and B)")
    bits: int = Field(description="Payload bits (the paper's count: positions/masks + signs + 16-bit scale)")
    ranks: dict[str, int] = Field(description="LoRA rank r_m of each module the adapter has")


class ClusterInfo(BaseModel):
    id: int
    rank: int = Field(description="Rank r_c of this cluster's U_c, V_c and Σ_i")
    kind: Literal["shared", "exact", "svd", "compeft"] = Field(
        description="shared: a JD basis; exact: one adapter stored losslessly; svd: one adapter truncated; "
                    "compeft: one adapter's raw factors sparse-ternary coded (ComPEFT), Σ_i = LoRA scale")
    compeft: CompeftInfo | None = None


class AdapterInfo(BaseModel):
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


class Manifest(BaseModel):
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

    def module_index(self) -> dict[str, int]:
        return {m.name: i for i, m in enumerate(self.modules)}


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
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise StoreError(f"cannot read {path}: {e}") from None
    if raw.get("format") != FORMAT:
        raise StoreError(f"{path}: not a vllm-jd store (format={raw.get('format')!r})")
    if raw.get("format_version") not in READABLE_VERSIONS:
        raise StoreError(f"{path}: store format version {raw.get('format_version')} is not supported "
                         f"(this vllm-jd reads versions {', '.join(map(str, READABLE_VERSIONS))})")
    try:
        return Manifest.model_validate(raw)
    except ValueError as e:
        raise StoreError(f"{path}: malformed manifest: {e}") from None


def write_manifest(store: Path, manifest: Manifest) -> None:
    """Replace ``STORE/manifest.json`` atomically (write, fsync, rename)."""
    tmp = Path(store) / f".{MANIFEST}.{uuid.uuid4().hex}.tmp"
    tmp.write_text(manifest.model_dump_json(indent=1))
    with open(tmp, "rb") as f:
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
                from vllm_jd.compress.compeft_store import decode_bases  # compeft_store imports this module

                dims = {m.name: (m.d_in, m.d_out) for m in self.manifest.modules}
                c = self.manifest.clusters[cid]
                self._decoded = cid, decode_bases(self._raw(compeft_key(cid)), c.compeft, dims, c.rank)
            U, V = self._decoded[1][module]
            return U if which == "U" else V
        x = self._raw(key)
        return decode(x, self._raw(key + SCALE_SUFFIX) if x.dtype == torch.int8 else None)

    def _raw(self, key: str) -> torch.Tensor:
        shard = self.manifest.weight_map.get(key)
        if shard is None:
            raise StoreError(f"{self.store}: tensor {key} is not in the weight map")
        if shard not in self._open:
            try:
                self._open[shard] = safe_open(str(self.store / shard), framework="pt")
            except Exception as e:
                raise StoreError(f"{self.store}: cannot open shard {shard}: {e}") from None
        return self._open[shard].get_tensor(key)

    def sigma(self, name: str, module: str) -> torch.Tensor:
        """Σ of adapter ``name`` for ``module``: [r_c, r_c] (full) or [r_c] (diag)."""
        a = self.manifest.adapters[name]
        return self.get(sigma_key(a.cluster, a.block, module))[a.row]


def remove_adapter(store: Path, name: str) -> None:
    """Drop adapter ``name`` from the manifest (atomically, under the lock). Its tensors stay in
    their immutable shards, unread, until the next ``compress --from-store``."""
    with locked(store):
        manifest = read_manifest(store)
        if name not in manifest.adapters:
            raise StoreError(f"no adapter named {name!r} in {store}")
        del manifest.adapters[name]
        write_manifest(store, manifest)


@contextmanager
def locked(store: Path) -> Iterator[None]:
    """Exclusive lock on a store for read-modify-write commands (``add``).

    The lock is taken on the store directory itself, so locking writes nothing into the store.
    """
    if not (Path(store) / MANIFEST).exists():
        raise StoreError(f"{store} is not a vllm-jd store: no {MANIFEST}")
    fd = os.open(store, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


@contextmanager
def staged_directory(out: Path) -> Iterator[Path]:
    """Yield a sibling temporary directory that replaces ``out`` only if the block succeeds.

    ``out`` may be absent, empty, or an existing store; anything else is refused so that no
    user data is overwritten. On failure the temporary directory is removed and ``out`` is
    untouched.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).exists())):
        raise StoreError(f"refusing to overwrite {out}: it exists and is not a vllm-jd store")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    if out.exists():
        os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
