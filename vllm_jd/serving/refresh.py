"""Adapters added to the store while serving (``vllm-jd add``, ``/v1/load_lora_adapter``): the
worker reads the new Σ (and any new clusters' bases) from the store and serves them in place.

A mixin of ``manager.JDLoRAModelManager``: it works on that manager's row table, layers and
residency. Everything is read and checked before anything changes, so a bad entry leaves the
worker exactly as it was.
"""

from __future__ import annotations

import logging

import torch

from vllm_jd.envs import store_path
from vllm_jd.serving.growth import append_bases, cluster_bases, new_cluster_bases
from vllm_jd.store.errors import StoreError
from vllm_jd.store.format import TensorReader, read_manifest
from vllm_jd.store.validate import bad_rows, bad_value

logger = logging.getLogger(__name__)


def location(a) -> tuple[int, int, int]:
    """Where an adapter's Σ lives in the store: (cluster, block, row)."""
    return a.cluster, a.block, a.row


class AdapterRefresh:
    def jd_refresh(self, name: str) -> int:
        """Serve adapter ``name`` of the store, added since start (``vllm-jd add``, ``/v1/load_lora_adapter``)
        or registered again for other weights; returns its Σ row (the current one if unchanged).

        Its Σ goes into a spare (or reclaimed, ``rows.RowTable``) row in place, so CUDA graphs keep
        their pointers; new singleton clusters append their bases to every layer. Everything is
        read and checked before anything changes: on any error the worker is as it was.
        """
        store = store_path()
        # no store lock here: this runs in the engine's step loop, which must never wait on another
        # process. Shards are only collected when a version replaces another, which the version check
        # below turns into a clear error; one collected between that check and a read fails this load.
        manifest = read_manifest(store)
        if manifest.generation != self.jd_generation:
            raise StoreError(f"the store {store} was recompressed since this server loaded it (version "
                             f"{self.jd_generation[:8] or '-'} → {manifest.generation[:8]}); switch to it with "
                             "POST /v1/jd/store or restart the server to serve new adapters")
        a = manifest.adapters.get(name)
        if a is None:
            why = manifest.broken.get(name)
            raise StoreError(f"adapter {name!r} is not in the vllm-jd store {store}"
                             + (f": its entry is broken ({why})" if why else ""))
        row = self.jd_table.current(name, location(a))
        if row is not None:
            return row
        if a.cluster in self._jd_placeholders:  # appended as zeros while no adapter used it
            raise StoreError(f"adapter {name!r} is in cluster {a.cluster}, which this server holds no bases for; "
                             "restart the server to serve it")
        reader = TensorReader(store, manifest)
        fresh, bases, placeholders = self._jd_new_clusters(manifest, reader)
        sigmas = self._jd_read_sigma(name, manifest, reader)
        in_use = {lora.jd_row for lora in self._registered_adapters.values()}
        row, used_before = self.jd_table.take(name, set(manifest.adapters), in_use)
        for i, (_, _, w) in enumerate(self._jd_layers):
            if fresh and self.jd_residency is not None:  # host memory grows, the device slots do not
                self.jd_residency.append_clusters(i, *bases[i])
            elif fresh:
                append_bases(w, *bases[i])
            if used_before:
                w.sigma[row].zero_()
            for s, sig in sigmas[i]:
                r = sig.shape[0]
                if sig.dim() == 2:
                    w.sigma[row, s, :r, :r] = sig
                else:
                    w.sigma[row, s, :r] = sig
        self.jd_table.assign(name, row, location(a))
        self._jd_placeholders |= placeholders
        self._jd_publish_clusters()
        self._jd_last_index_mapping = None
        logger.info("vllm-jd: serving %s (row %d%s)", name, row, f", {len(fresh)} new clusters" if fresh else "")
        return row

    def _jd_new_clusters(self, manifest, reader) -> tuple[list, list, frozenset]:
        """The store's clusters this worker lacks, each layer's bases for them (not yet applied), and
        the ids among them no adapter uses (appended as zeros)."""
        if self.jd_residency is not None:
            C_old = self.jd_residency.num_clusters
        else:
            C_old = int(self._jd_layers[0][2].num_clusters) if self._jd_layers else 0
        fresh = [c for c in manifest.clusters if c.id >= C_old]
        if not fresh:
            return [], [], frozenset()
        # a cluster no adapter uses (its registration was rolled back, its adapters deleted) only
        # holds its place: zeros, whatever its rank, so it never blocks the clusters after it
        used = {a.cluster for a in manifest.adapters.values()}
        placeholders = frozenset(c.id for c in fresh if c.id not in used)
        if any(c.rank > self.jd_rank for c in fresh if c.id not in placeholders):
            worst = max(c.rank for c in fresh if c.id not in placeholders)
            raise StoreError(f"a new cluster has rank {worst} > the served rank {self.jd_rank}; restart the server "
                             "to serve it")
        if self.jd_residency is None and torch.device(self.device).type == "cuda" and not self.jd_eager:
            raise StoreError("a new adapter needs its own cluster; with CUDA graphs that needs a restart "
                             "(or serve with --enforce-eager)")
        make = new_cluster_bases if self.jd_residency is not None else cluster_bases
        bases = [make(module, names, w, reader, fresh, placeholders) for module, names, w in self._jd_layers]
        for V, U in bases:
            if (why := bad_value(V) or next((b for u in U if (b := bad_value(u))), None)) is not None:
                raise StoreError(f"a new cluster's basis {why}; not served (see `vllm-jd fsck`)")
        return fresh, bases, placeholders

    def _jd_read_sigma(self, name: str, manifest, reader) -> list[list[tuple[int, torch.Tensor]]]:
        """Adapter ``name``'s Σ per layer: [(slice, Σ in the layer's dtype)]; StoreError on bad values."""
        index = {m.name: i for i, m in enumerate(manifest.modules)}
        errors = manifest.adapters[name].module_errors
        out = []
        for _, names, w in self._jd_layers:
            layer = []
            for s, n in enumerate(names):
                if n in index and errors[index[n]] is not None:
                    sig = reader.sigma(name, n)
                    if len(bad_rows(sig[None])):
                        raise StoreError(f"adapter {name!r}: its Σ for {n} has NaN, Inf or huge entries; not served")
                    layer.append((s, sig.to(w.sigma.dtype)))
            out.append(layer)
        return out
