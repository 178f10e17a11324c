"""``compress --from-store``: the adapters of an existing store as input to a new compression.

The paper re-clusters everything, added adapters included, every few hours. The best input is
each adapter's original PEFT folder, which the manifest records (``source``, ``checksum``): it
is used when it still exists unchanged. Otherwise the adapter is rebuilt from the store itself,
``lora_A = V_cᵀ`` [r_c, d_in], ``lora_B = U_c Σ_i`` [d_out, r_c] (scale 1): exact for exact
singletons, and for shared clusters the stored approximation, whose error then adds to the new
one's; each such adapter is named in a warning.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from vllm_jd.compress.peft_io import ModuleSpec, PeftAdapter, open_adapter
from vllm_jd.compress.store import Manifest, TensorReader, read_manifest, u_key, v_key

logger = logging.getLogger(__name__)


class StoredAdapter:
    """PeftAdapter's interface over one adapter of a store (its reconstruction U_c Σ_i V_cᵀ)."""

    def __init__(self, reader: TensorReader, name: str):
        m: Manifest = reader.manifest
        self.reader, self.name = reader, name
        self.info = m.adapters[name]
        self.path = Path(self.info.source)  # recorded as the new store's source too
        rank = m.clusters[self.info.cluster].rank
        self.modules = {mod.name: ModuleSpec(u_key(self.info.cluster, mod.name), v_key(self.info.cluster, mod.name),
                                             rank, mod.d_in, mod.d_out, 1.0)
                        for mod, err in zip(m.modules, self.info.module_errors) if err is not None}
        self.lora_params = self.info.lora_params  # the source adapter's, so Para. Saved stays comparable
        self.base_model = m.base_model

    def raw_factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(lora_A = V_cᵀ [r, d_in], lora_B = U_c Σ_i [d_out, r]) float32."""
        c = self.info.cluster
        U, V = self.reader.get(u_key(c, module)), self.reader.get(v_key(c, module))
        s = self.reader.sigma(self.name, module)
        B = U @ s if s.dim() == 2 else U * s
        return V.T.contiguous(), B.contiguous()

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [r, d_in], Bt [r, d_out]) with P = Btᵀ A, as ``PeftAdapter.factors``."""
        a, b = self.raw_factors(module)
        return a, b.T.contiguous()

    def checksum(self) -> str:
        return self.info.checksum  # the identity of the source adapter, carried over


def store_adapters(store: str | Path) -> list[PeftAdapter | StoredAdapter]:
    """Every adapter of ``store``: its unchanged source folder if it still exists, else rebuilt."""
    store = Path(store)
    manifest = read_manifest(store)
    reader = TensorReader(store, manifest)
    out: list[PeftAdapter | StoredAdapter] = []
    rebuilt = []
    for name, info in manifest.adapters.items():
        src = Path(info.source)
        if src.is_dir():
            try:
                a = open_adapter(name, src)
                if a.checksum() == info.checksum:
                    out.append(a)
                    continue
            except ValueError:
                pass  # unreadable now: fall back to the store's copy
        out.append(StoredAdapter(reader, name))
        rebuilt.append(name)
    if rebuilt:
        logger.warning("%d of %d adapters are rebuilt from %s (source missing or changed; their stored error "
                       "adds to the new one): %s%s", len(rebuilt), len(out), store, ", ".join(rebuilt[:5]),
                       " …" if len(rebuilt) > 5 else "")
    return out
