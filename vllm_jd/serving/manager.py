"""Worker-side adapter management: every basis and Σ resident, an adapter is a Σ row.

vLLM's LoRA manager loads an adapter from disk into a slot (``max_loras`` slots, each a full
R×d copy). Here the store is loaded once at start; "loading" an adapter is a manifest lookup
(name → Σ row), activating it touches only vLLM's slot bookkeeping, and each step the token →
adapter mapping becomes token → (Σ row, cluster) metadata shared by every layer.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import numpy as np
import torch
import vllm.lora.model_manager as vllm_model_manager
import vllm.lora.utils as vllm_lora_utils
from vllm.lora.layers.utils import LoRAMappingType
from vllm.lora.lora_model import LoRAModel
from vllm.lora.model_manager import LRUCacheLoRAModelManager
from vllm.utils.gpu_sync_debug import gpu_sync_allowed

from vllm_jd.envs import max_resident_clusters, store_path
from vllm_jd.kernels import jd_fused_cpu
from vllm_jd.kernels.weights import JDLayerWeights
from vllm_jd.serving.bank import Bank, load_bank
from vllm_jd.serving.growth import spare_adapters
from vllm_jd.serving.layers import JD_CLASS_FOR, JDLayerMixin
from vllm_jd.serving.refresh import AdapterRefresh, location
from vllm_jd.serving.residency import ResidentBases
from vllm_jd.serving.rows import RowTable
from vllm_jd.serving.snapshot import Snapshot
from vllm_jd.serving.state import JDState
from vllm_jd.serving.store_switch import StoreSwitch
from vllm_jd.store.errors import StoreError

logger = logging.getLogger(__name__)




class JDLoRAModel(LoRAModel):
    """An adapter of the store: no weights, just its Σ row."""

    def __init__(self, lora_model_id: int, rank: int, row: int):
        super().__init__(lora_model_id, rank, {})
        self.jd_row = row

    def clone(self, lora_model_id: int) -> JDLoRAModel:
        return JDLoRAModel(lora_model_id, self.rank, self.jd_row)


def _jd_from_layer(layer, max_loras, lora_config, packed_modules_list, model_config=None):
    """vLLM's ``from_layer``, substituting our class for the stock class vLLM would pick."""
    for lora_cls in vllm_lora_utils._all_lora_classes:
        if lora_cls.can_replace_layer(source_layer=layer, lora_config=lora_config,
                                      packed_modules_list=packed_modules_list, model_config=model_config):
            jd_cls = JD_CLASS_FOR.get(lora_cls)
            if jd_cls is None:
                raise StoreError(f"vllm-jd cannot serve LoRA on {type(layer).__name__} "
                                 f"(vLLM would use {lora_cls.__name__}); remove that module from the store")
            instance = jd_cls(layer)
            instance.create_lora_weights(max_loras, lora_config, model_config)
            return instance
    return layer


@contextmanager
def _substitute_from_layer():
    original = vllm_model_manager.from_layer
    vllm_model_manager.from_layer = _jd_from_layer
    try:
        yield
    finally:
        vllm_model_manager.from_layer = original


class JDLoRAModelManager(StoreSwitch, AdapterRefresh, LRUCacheLoRAModelManager):
    """LRUCacheLoRAModelManager whose layers read shared bases and a resident Σ table. Adapters
    registered while serving: ``refresh.AdapterRefresh``; store switches: ``store_switch.StoreSwitch``."""

    def __init__(self, model, max_num_seqs, max_num_batched_tokens, vocab_size, lora_config, device, vllm_config):
        if vllm_config is not None and vllm_config.parallel_config.use_ubatching:
            # micro-batches hand each layer a slice of the step's tokens; our tiles index the whole step
            raise StoreError("vllm-jd cannot serve with micro-batching (--enable-dbo / ubatch size > 1); turn it off")
        self.jd_dtype = lora_config.lora_dtype if isinstance(lora_config.lora_dtype, torch.dtype) else torch.float32
        self._jd_use_bank(load_bank(store_path(), device="cpu", dtype=self.jd_dtype, rank_policy=self._jd_rank_policy(device)))
        self._jd_layers: list[tuple[JDLayerMixin, list[str], JDLayerWeights]] = []
        self.jd_state = JDState(self.jd_cluster_of_row, self.jd_none_row, device, max_tokens=max_num_batched_tokens,
                                max_segs=max_num_seqs + 1)
        if lora_config.target_modules is None:
            lora_config.target_modules = sorted({m.rsplit(".", 1)[-1] for m in self.jd_bank.U})
        budget = max_resident_clusters()
        self.jd_residency = ResidentBases(budget, device) if budget is not None else None
        self._jd_snapshot = Snapshot("worker")
        self.jd_eager = bool(vllm_config is not None and vllm_config.model_config is not None
                             and vllm_config.model_config.enforce_eager)
        super().__init__(model, max_num_seqs, max_num_batched_tokens, vocab_size, lora_config, device, vllm_config)
        self._jd_bind_layers()
        self.jd_bank.U.clear(), self.jd_bank.V.clear(), self.jd_bank.sigma.clear()  # the layers own them now

    def _jd_rank_policy(self, device):
        """``jd_fused_cpu.served_rank`` on a CPU (a store whose rank keeps the fused kernel from
        running is served zero-padded to one it takes), nothing on a GPU."""
        if torch.device(device).type != "cpu":
            return None
        return lambda rank, dims: jd_fused_cpu.served_rank(rank, self.jd_dtype, dims)

    def _jd_use_bank(self, bank: Bank, min_capacity: int = 0) -> None:
        """Row bookkeeping for ``bank`` (its Σ rows, then spare rows for adapters registered later)."""
        self.jd_bank = bank
        self.jd_table = RowTable.start(bank.rows, {n: location(bank.manifest.adapters[n]) for n in bank.rows},
                                       bank.cluster.numpy(), bank.none_row, spare_adapters(), min_capacity)
        self.jd_generation = bank.manifest.generation
        self._jd_name_id: dict[str, int] = {}
        self.jd_rank = bank.rank
        self.jd_none_row = bank.none_row
        self._jd_id_to_row = np.full(1024, self.jd_none_row, dtype=np.int64)
        self._jd_last_index_mapping: tuple | None = None
        self._jd_placeholders: set[int] = set()  # clusters appended as zeros (no adapter used them)
        self._jd_name_map: dict[str, str] | None = None  # vLLM → store module names (_jd_vllm_to_store)

    @property
    def jd_cluster_of_row(self) -> np.ndarray:
        return self.jd_table.cluster_of_row

    @property
    def _jd_row_capacity(self) -> int:
        return self.jd_table.capacity

    # ---- which modules, and their weights -------------------------------------------------
    def _jd_vllm_to_store(self) -> dict[str, str]:
        """vLLM module name → the store's (checkpoint) name, where the model renames them: vLLM
        maps a LoRA checkpoint's names through the model's ``hf_to_vllm_mapper`` (its Transformers
        backend, e.g., turns ``gpt_neox.`` into ``model.``), so the store, which keeps the
        checkpoint's names (exports load in PEFT), is looked up the same way. Once per store."""
        if self._jd_name_map is None:
            mapper = getattr(self.model, "hf_to_vllm_mapper", None)
            mapper = mapper.get_rename_mapper() if mapper is not None else None
            renamed = {n: mapper._map_name(n) for n in self.jd_bank.module_dims()} if mapper is not None else {}
            self._jd_name_map = {v: n for n, v in renamed.items() if v is not None and v != n}
        return self._jd_name_map

    def _jd_store_names(self, module_name: str, n_slices: int | None = None) -> list[str]:
        """The store's names of vLLM module ``module_name``'s slices (packed layers have several)."""
        parent, _, leaf = module_name.rpartition(".")
        children = self.packed_modules_mapping.get(leaf)
        to_store = self._jd_vllm_to_store()
        if children and (n_slices is None or n_slices == len(children)):
            return [to_store.get(n, n) for n in (f"{parent}.{c}" if parent else c for c in children)]
        return [to_store.get(module_name, module_name)]

    def _match_target_modules(self, module_name: str) -> bool:
        return any(n in self.jd_bank.U for n in self._jd_store_names(module_name))

    def _create_lora_modules(self):
        with _substitute_from_layer():
            super()._create_lora_modules()

    def _jd_bind_layers(self) -> None:
        bank, used = self.jd_bank, set()
        for module_name, module in self.modules.items():
            if not isinstance(module, JDLayerMixin):
                continue
            names = self._jd_store_names(module_name, module.n_slices)
            used.update(n for n in names if n in bank.U)
            w = self._jd_layer_weights(module_name, module, names)
            if self.jd_residency is not None:  # all clusters to host memory, K slots on the device
                w = self.jd_residency.add_layer(w)
            if w.V_all.is_cuda:
                w.expand_bases()  # the GPU expand's layout, made before any graph is captured
            module.jd_bind(w, self.jd_state)
            self._jd_layers.append((module, names, w))
        self._jd_check_unused(used)
        self._jd_publish_clusters()
        if torch.device(self.device).type == "cuda":
            self._jd_check_kernels()
        logger.info("vllm-jd: %d layers bound to store %s (%d adapters, %d clusters, rank %d%s)",
                    sum(isinstance(m, JDLayerMixin) for m in self.modules.values()), bank.store,
                    len(bank.names), bank.num_clusters, bank.rank,
                    f", {self.jd_residency.slots} resident" if self.jd_residency is not None else "")

    def _jd_check_kernels(self) -> None:
        """Refuse to serve when the GPU kernels disagree with the float32 twin on this device."""
        from vllm_jd.kernels.gpu.selfcheck import check_served

        with gpu_sync_allowed():  # once, at start: it copies results back to compare them
            why = check_served([w for _, _, w in self._jd_layers])
        if why is not None:
            raise StoreError(f"vllm-jd refuses to serve: {why}")
        logger.info("vllm-jd: GPU kernels agree with the float32 twin at every served layer shape")

    def _jd_check_unused(self, used: set[str]) -> None:
        bank = self.jd_bank
        if unused := sorted(set(bank.U) - used):
            dims = bank.module_dims()[unused[0]]
            raise StoreError(f"store module {unused[0]} ({dims[0]}→{dims[1]}) matches no LoRA-capable layer of "
                             f"{type(self.model).__name__} ({len(unused)} such modules): the store was built for "
                             "another model")

    def _jd_layer_weights(self, module_name: str, module: JDLayerMixin, names: list[str]) -> JDLayerWeights:
        """One layer's weights from the bank: every cluster's bases (cut for this TP rank) and Σ rows
        with the spare rows appended; on the layer's device."""
        bank = self.jd_bank
        C, R = bank.num_clusters, bank.rank
        present = [n in bank.U for n in names]
        if module.tp_size == 1:
            for s, name in enumerate(names):
                exp = (module.input_size, module.output_slices[s])
                got = (bank.V[name].shape[1], bank.U[name].shape[1]) if present[s] else exp
                if got != exp:
                    raise StoreError(f"store module {name} maps {got[0]}→{got[1]} but the model's {module_name} "
                                     f"(slice {s}) maps {exp[0]}→{exp[1]}: the store was built for another model")
        U, V = module.jd_shard([bank.U[n] if p else None for n, p in zip(names, present, strict=True)],
                               [bank.V[n] if p else None for n, p in zip(names, present, strict=True)])
        dtype = next(u.dtype for u in U if u is not None)
        U = [u if u is not None else torch.zeros(C, module.output_slices[s], R, dtype=dtype) for s, u in enumerate(U)]
        V = [v if v is not None else torch.zeros(C, module.input_size, R, dtype=dtype) for v in V]
        zero_sigma = torch.zeros_like(next(iter(bank.sigma.values())))
        sigma = torch.stack([bank.sigma[n] if p else zero_sigma for n, p in zip(names, present, strict=True)])
        spare = self._jd_row_capacity - sigma.shape[1]  # rows for adapters registered while serving
        sigma = torch.cat([sigma, sigma.new_zeros((sigma.shape[0], spare) + tuple(sigma.shape[2:]))], 1)
        dev = self.device
        return JDLayerWeights.from_bases(torch.stack(V).to(dev), [u.to(dev) for u in U], sigma.to(dev))

    # ---- resident cluster budget --------------------------------------------------------------
    def _jd_publish_clusters(self) -> None:
        """Tell the layers' metadata which basis block each Σ row reads: its cluster, or with a
        budget the slot its cluster is in."""
        if self.jd_residency is None:
            self.jd_state.set_clusters(self.jd_cluster_of_row)
        else:
            self.jd_state.set_clusters(self.jd_residency.slot_of_cluster()[self.jd_cluster_of_row])

    def jd_set_table(self, slots) -> None:
        """The scheduler's slot table for the coming step (``SchedulerOutput.jd_slots`` = (store,
        table)); a table for another store version (the scheduler has not seen the switch yet) is
        ignored: the step's clusters are then loaded on demand."""
        store, table = slots
        if store != store_path():
            return
        if self.jd_residency is None:
            raise StoreError("the scheduler sends a cluster slot table but this worker has no budget "
                             "(VLLM_JD_MAX_RESIDENT_CLUSTERS is not set in the worker)")
        if self.jd_residency.set_table(table):
            self._jd_publish_clusters()
            self._jd_last_index_mapping = None
            self._jd_snapshot.write(self.jd_load_stats(), force=True)

    def jd_load_stats(self) -> dict:
        r = self.jd_residency
        if r is None:
            return {}
        return {"loads": {str(c): n for c, n in r.stats.loads.items()}, "copy_seconds": r.stats.copy_seconds,
                "stall_seconds": r.stats.stall_seconds, "table": r.table.tolist()}

    # ---- adapters are Σ rows ---------------------------------------------------------------
    def _add_adapter(self, lora: LoRAModel):
        row = getattr(lora, "jd_row", None)
        if row is None:
            raise StoreError("only adapters of the vllm-jd store can be served while a store is loaded")
        if lora.id >= self._jd_id_to_row.shape[0]:
            grown = np.full(max(2 * self._jd_id_to_row.shape[0], lora.id + 1), self.jd_none_row, dtype=np.int64)
            grown[: self._jd_id_to_row.shape[0]] = self._jd_id_to_row
            self._jd_id_to_row = grown
        self._jd_id_to_row[lora.id] = row
        self._jd_last_index_mapping = None
        self._registered_adapters[lora.id] = lora

    def activate_adapter(self, lora_id: int) -> bool:
        """Slot bookkeeping only: the layers read Σ rows, so nothing is copied."""
        if lora_id in self._active_adapters:
            self._active_adapters.touch(lora_id)
            return False
        if len(self._active_adapters) >= self.lora_slots:
            self._active_adapters.remove_oldest()
        index = self.lora_index_to_id.index(None)
        self._active_adapters[lora_id] = None
        self.lora_index_to_id[index] = lora_id
        return True

    def create_dummy_lora(self, lora_id: int, rank: int, embedding_modules=None) -> LoRAModel:
        return JDLoRAModel(lora_id, rank, self.jd_none_row)  # warm-up adapters add exactly zero

    def set_adapter_mapping(self, mapping) -> None:
        """Token → lora id (0 = none) becomes token → (Σ row, cluster) for every layer."""
        if getattr(mapping, "type", LoRAMappingType.LANGUAGE) != LoRAMappingType.LANGUAGE:
            return  # a vision tower's or connector's tokens: our layers are the language model's
        if mapping.index_mapping == self._jd_last_index_mapping:
            return
        ids = np.fromiter(mapping.index_mapping, dtype=np.int64, count=len(mapping.index_mapping))
        rows = self._jd_id_to_row[np.clip(ids, 0, self._jd_id_to_row.shape[0] - 1)]
        rows = np.where(ids > 0, rows, self.jd_none_row)
        if self.jd_residency is not None:
            loaded = self.jd_residency.ensure(self.jd_cluster_of_row[rows[rows != self.jd_none_row]])
            if loaded:
                self._jd_publish_clusters()  # loaded on demand: no table from the scheduler
            self._jd_snapshot.write(self.jd_load_stats(), force=loaded)
        self.jd_state.update(rows, lora_active=bool((ids > 0).any()))
        self._jd_last_index_mapping = mapping.index_mapping

    def remove_all_adapters(self):
        super().remove_all_adapters()
        self._jd_last_index_mapping = None
