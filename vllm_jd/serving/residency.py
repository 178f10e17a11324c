"""A resident cluster budget: K device slots for the bases of C clusters, the rest in host memory.

No vLLM import. Every layer's ``JDLayerWeights`` holds K slots instead of C clusters (``slot s``
= cluster block s of ``V_all`` / ``UT``); the host keeps all C clusters (pinned on CUDA). Σ rows
of every adapter stay resident: a token's Σ row is looked up as before, only its basis index
becomes ``slot_of_cluster[cluster]``.

Who decides residency: the scheduler (``vllm_jd.scheduler``) sends the whole slot table with
every step (``set_table``); a slot whose cluster changed is copied from the host
*asynchronously* (CPU: one background thread; CUDA: a side stream ordered after the work already
queued), and a step waits for a copy only when it uses that slot (``ensure``). The cluster-aware
policy loads clusters a step before it admits their requests, so the copy overlaps a forward; the
FCFS baseline admits first, so its steps wait. Without a table (another scheduler) ``ensure``
loads what a step needs on demand, replacing the least recently used slot.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from vllm_jd.kernels.weights import JDLayerWeights

logger = logging.getLogger(__name__)

EMPTY = -1


@dataclass
class HostBases:
    """One layer's bases of all C clusters in host memory.

    V: [C, d_in, S·R] (cluster c's columns of ``V_all``); UT: S tensors [C, R, d_s].
    """

    V: torch.Tensor
    UT: list[torch.Tensor]

    @classmethod
    def split(cls, w: JDLayerWeights, slots: int, pin: bool) -> tuple[HostBases, JDLayerWeights]:
        """Move all of ``w``'s clusters to the host; return them and ``w`` cut to ``slots`` empty slots."""
        C, R, d_in = w.num_clusters, w.rank, w.V_all.shape[0]
        V = w.V_all.view(d_in, C, -1).permute(1, 0, 2).to("cpu", copy=True).contiguous()
        UT = [ut.view(C, R, -1).to("cpu", copy=True) for ut in w.UT]
        if pin:
            V, UT = V.pin_memory(), [u.pin_memory() for u in UT]
        dev = w.V_all.device
        device_w = JDLayerWeights(torch.zeros(d_in, slots * V.shape[2], dtype=V.dtype, device=dev),
                                  [torch.zeros(slots * R, u.shape[2], dtype=u.dtype, device=dev) for u in UT],
                                  w.sigma, slots, R)
        if dev.type == "cpu":  # the CPU path's derived layouts, made now so that copies keep them current
            device_w.reset_caches(rebuild=True)
            device_w.V_grid()  # the torch path's, made before any copy runs: refresh_slot keeps it current
        return cls(V, UT), device_w

    @property
    def num_clusters(self) -> int:
        return self.V.shape[0]

    def append(self, V: torch.Tensor, UT: list[torch.Tensor]) -> None:
        """Add clusters: V [n, d_in, S·R], UT S tensors [n, R, d_s]."""
        pin = self.V.is_pinned()
        self.V = torch.cat([self.V, V.to(self.V.dtype)])
        self.UT = [torch.cat([u, n.to(u.dtype)]) for u, n in zip(self.UT, UT, strict=True)]
        if pin:
            self.V, self.UT = self.V.pin_memory(), [u.pin_memory() for u in self.UT]

    def copy_to(self, w: JDLayerWeights, cluster: int, slot: int) -> None:
        """Cluster ``cluster``'s bases into slot ``slot`` of the device weights ``w``."""
        width, R = self.V.shape[2], w.rank
        w.V_all[:, slot * width:(slot + 1) * width].copy_(self.V[cluster], non_blocking=True)
        for ut, host in zip(w.UT, self.UT, strict=True):
            ut[slot * R:(slot + 1) * R].copy_(host[cluster], non_blocking=True)
        w.refresh_slot(slot)  # the CPU paths' layouts of the slot


@dataclass
class LoadStats:
    loads: dict[int, int] = field(default_factory=dict)
    """cluster → times its bases were copied to the device."""
    copy_seconds: float = 0.0
    """Time spent copying (CPU: the copy thread; CUDA: measured by events)."""
    stall_seconds: float = 0.0
    """Time steps waited for a copy (the part of loading that was in a step's critical path; on
    CUDA the host does not wait, the stream does, so this stays near zero there)."""


class ResidentBases:
    """K device slots shared by every layer; see the module docstring."""

    def __init__(self, slots: int, device: torch.device | str):
        if slots < 1:
            raise ValueError(f"the resident cluster budget must be ≥ 1, got {slots}")
        self.slots = slots
        self.device = torch.device(device)
        self.table = np.full(slots, EMPTY, dtype=np.int64)
        """Cluster in each slot (EMPTY = none)."""
        self.layers: list[tuple[JDLayerWeights, HostBases]] = []
        self.stats = LoadStats()
        self._last_use = np.zeros(slots, dtype=np.int64)
        self._step = 0
        self._pending: dict[int, Future | torch.cuda.Event] = {}
        self._timing: list = []  # CUDA: (start, done) events of copies whose time is not read yet
        self._copier = ThreadPoolExecutor(1, thread_name_prefix="vllm-jd-load") if self.device.type != "cuda" else None
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    # ---- layers ------------------------------------------------------------------------------
    def add_layer(self, w: JDLayerWeights) -> JDLayerWeights:
        """Take over layer weights holding all clusters; returns the K-slot weights to serve from."""
        host, device_w = HostBases.split(w, self.slots, pin=self.device.type == "cuda")
        self.layers.append((device_w, host))
        return device_w

    @property
    def num_clusters(self) -> int:
        return self.layers[0][1].num_clusters if self.layers else 0

    def slot_of_cluster(self) -> np.ndarray:
        """[C] slot of every cluster; non-resident clusters map to slot 0 (never used by a step:
        ``ensure`` makes a step's clusters resident first)."""
        out = np.zeros(max(self.num_clusters, 1), dtype=np.int64)
        for s, c in enumerate(self.table):
            if c != EMPTY:
                out[c] = s
        return out

    # ---- residency ---------------------------------------------------------------------------
    def set_table(self, table) -> bool:
        """Make the slots hold ``table`` [K] (cluster per slot, EMPTY = free), copying changed
        slots asynchronously. Returns whether anything changed."""
        table = np.asarray(table, dtype=np.int64)
        if table.shape != (self.slots,):
            raise ValueError(f"slot table of shape {table.shape}, expected ({self.slots},)")
        if (bad := table[(table != EMPTY) & ((table < 0) | (table >= self.num_clusters))]).size:
            raise ValueError(f"slot table names cluster {int(bad[0])}; the store has {self.num_clusters}")
        changed = False
        for s in np.flatnonzero(table != self.table):
            self.table[s] = table[s]
            if table[s] != EMPTY:
                self._load(int(table[s]), int(s))
            changed = True
        return changed

    def ensure(self, clusters) -> bool:
        """Make ``clusters`` (those a step uses) resident and wait for their copies. A cluster not
        in the table replaces the least recently used slot that the step does not use. Returns
        whether the table changed. ValueError when the step uses more than K clusters."""
        need = sorted({int(c) for c in clusters})
        if len(need) > self.slots:
            raise ValueError(f"a step uses {len(need)} clusters but only {self.slots} fit on the device "
                             "(--jd-max-resident-clusters); serve with vllm-jd's scheduler")
        self._step += 1
        changed = False
        for c in need:
            where = np.flatnonzero(self.table == c)
            if where.size == 0:
                used = np.isin(self.table, need)
                free = np.flatnonzero(self.table == EMPTY)
                s = int(free[0]) if free.size else int(np.argmin(np.where(used, np.iinfo(np.int64).max,
                                                                           self._last_use)))
                self.table[s] = c
                self._load(c, s)
                changed = True
                where = np.array([s])
            self._last_use[where[0]] = self._step
            self._wait(int(where[0]))
        return changed

    def _load(self, cluster: int, slot: int) -> None:
        self.stats.loads[cluster] = self.stats.loads.get(cluster, 0) + 1
        if self._stream is not None:
            current = torch.cuda.current_stream(self.device)
            start, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self._stream.wait_stream(current)  # after the steps that may still read the slot
            with torch.cuda.stream(self._stream):
                start.record()
                for w, host in self.layers:
                    host.copy_to(w, cluster, slot)
                done.record()
            self._pending[slot] = done
            self._timing.append((start, done))
            return
        previous = self._pending.get(slot)

        def copy() -> None:
            if previous is not None:
                previous.result()
            t = time.perf_counter()
            for w, host in self.layers:
                host.copy_to(w, cluster, slot)
            self.stats.copy_seconds += time.perf_counter() - t

        self._pending[slot] = self._copier.submit(copy)

    def _wait(self, slot: int) -> None:
        pending = self._pending.pop(slot, None)
        if pending is None:
            return
        t = time.perf_counter()
        if isinstance(pending, Future):
            pending.result()
        else:
            torch.cuda.current_stream(self.device).wait_event(pending)  # the GPU waits, not the host
            while self._timing and self._timing[0][1].query():  # copies done by now: read their time
                start, done = self._timing.pop(0)
                self.stats.copy_seconds += start.elapsed_time(done) / 1e3
        self.stats.stall_seconds += time.perf_counter() - t

    def close(self) -> None:
        """Wait for every copy in flight (before the weights are handed to another owner)."""
        for slot in list(self._pending):
            self._wait(slot)
        if self._copier is not None:
            self._copier.shutdown(wait=True)

    def append_clusters(self, layer: int, V: torch.Tensor, UT: list[torch.Tensor]) -> None:
        """New clusters (registered while serving) for layer ``layer``'s host bases:
        V [n, d_in, S·R], UT S tensors [n, R, d_s]."""
        self.layers[layer][1].append(V, UT)
