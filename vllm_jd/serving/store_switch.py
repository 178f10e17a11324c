"""Switching a running server to another version of its store (``POST /v1/jd/store``).

A mixin of ``manager.JDLoRAModelManager``. Bases and Σ are replaced in the layers' weight
objects, in place where shapes agree (CUDA graphs keep their pointers); on any error the old
store keeps serving exactly as before.
"""

from __future__ import annotations

import logging
import os

import torch

from vllm_jd.envs import VLLM_JD_STORE
from vllm_jd.kernels.weights import JDLayerWeights
from vllm_jd.serving.bank import load_bank
from vllm_jd.serving.layers import JDLayerMixin
from vllm_jd.serving.residency import ResidentBases
from vllm_jd.store.errors import StoreError

logger = logging.getLogger(__name__)

BANK_STATE = ("jd_bank", "jd_table", "jd_generation", "_jd_name_id", "jd_rank", "jd_none_row", "_jd_id_to_row",
              "_jd_last_index_mapping", "_jd_placeholders", "_jd_name_map")
"""What the manager's ``_jd_use_bank`` sets: restored as a whole when a store switch fails."""


class StoreSwitch:
    def jd_switch_store(self, store: str) -> dict:
        """Serve ``store`` from now on (the admin route ``POST /v1/jd/store``; the API server has
        drained every request first). Bases and Σ are replaced in the layers' weight objects (the
        op looks them up by layer id); tensors of unchanged shape are overwritten in place, so
        CUDA graphs stay valid, and any other shape is refused under CUDA graphs. vLLM's adapter
        ids are forgotten: the API server registers the new store's names under new ids."""
        bank = load_bank(store, device="cpu", dtype=self.jd_dtype, rank_policy=self._jd_rank_policy(self.device))
        cuda_graphs = torch.device(self.device).type == "cuda" and not self.jd_eager
        old_bank, old_capacity = self.jd_bank, self._jd_row_capacity
        saved = {k: getattr(self, k) for k in BANK_STATE}
        self._jd_use_bank(bank, min_capacity=old_capacity if cuda_graphs else 0)
        try:
            used: set[str] = set()
            fresh = []
            for module_name, module in self.modules.items():
                if isinstance(module, JDLayerMixin):
                    names = self._jd_store_names(module_name, module.n_slices)
                    used.update(n for n in names if n in bank.U)
                    fresh.append(self._jd_layer_weights(module_name, module, names))
            self._jd_check_unused(used)
            residency = ResidentBases(self.jd_residency.slots, self.device) if self.jd_residency is not None else None
            if residency is not None:
                fresh = [residency.add_layer(w) for w in fresh]
            for (_, _, old), new in zip(self._jd_layers, fresh, strict=True):
                if cuda_graphs and _shapes(old) != _shapes(new):
                    raise StoreError(f"store {store} needs other tensor shapes than {old_bank.store} "
                                     f"({_shapes(new)} vs {_shapes(old)}); with CUDA graphs switch by restarting "
                                     "(or serve with --enforce-eager)")
        except Exception:  # the old store keeps serving exactly as before, registrations included
            self.__dict__.update(saved)
            raise
        if self.jd_residency is not None:
            self.jd_residency.close()  # no copy of the old store may land after this point
        for i, ((_, _, old), new) in enumerate(zip(self._jd_layers, fresh, strict=True)):
            _assign(old, new)
            if residency is not None:
                residency.layers[i] = (old, residency.layers[i][1])
        self.jd_residency = residency
        os.environ[VLLM_JD_STORE] = str(store)
        self.jd_state.none_row = self.jd_none_row
        self.remove_all_adapters()
        self._jd_publish_clusters()
        self.jd_bank.U.clear(), self.jd_bank.V.clear(), self.jd_bank.sigma.clear()
        logger.info("vllm-jd: switched from %s to %s (%d adapters, %d clusters, rank %d)", old_bank.store, store,
                    len(bank.names), bank.num_clusters, bank.rank)
        return {"store": str(store), "adapters": len(bank.names), "clusters": bank.num_clusters}


def _shapes(w: JDLayerWeights) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in (w.V_all, *w.UT, w.sigma)]


def _assign(old: JDLayerWeights, new: JDLayerWeights) -> None:
    """Make ``old`` (the object the op holds) serve ``new``'s tensors: in place where shapes agree."""
    for name in ("V_all", "sigma"):
        a, b = getattr(old, name), getattr(new, name)
        if a.shape == b.shape and a.dtype == b.dtype:
            a.copy_(b)
        else:
            setattr(old, name, b)
    if [u.shape for u in old.UT] == [u.shape for u in new.UT]:
        for a, b in zip(old.UT, new.UT, strict=True):
            a.copy_(b)
    else:
        old.UT = new.UT
    old.num_clusters, old.rank = new.num_clusters, new.rank
    old.reset_caches(rebuild=True)  # the kernels' layouts made now, between steps: a slot copy may follow at once
