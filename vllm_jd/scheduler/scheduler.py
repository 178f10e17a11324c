"""vLLM's scheduler with a resident cluster budget: ``--scheduler-cls vllm_jd.scheduler.scheduler.JDScheduler``.

Glue only; every decision is ``policy.plan_step`` (cluster-aware) or ``policy.plan_fcfs`` (the
baseline, vLLM's own rule with clusters in place of adapters). Each step:

1. the waiting and running requests become ``policy.Request``s (cluster from the store's
   manifest, by LoRA id; base-model requests are ``BASE``);
2. the plan's evictions and loads update the slot table (K entries, cluster per slot);
3. vLLM's own ``schedule()`` runs, admitting only the plan's requests: the others are refused
   in ``_handle_blocked_waiting_request``, vLLM's hook for "not ready, skip this step" (the same
   path as its ``max_loras`` check), so token budgets, KV blocks and preemption stay vLLM's;
4. the slot table rides on the ``SchedulerOutput`` (``jd_slots``) to the workers, which copy
   changed slots from host memory (``serving/residency.py``).

A cluster loaded by the plan admits requests in the same step (``admit_on_load``): the worker
waits for that copy, which is short next to a step. vLLM ≠ 0.32.0 is refused.

With async scheduling (vLLM's default on CUDA) the engine needs an ``AsyncScheduler``: a custom
class does not change that setting, so ``JDScheduler`` becomes ``JDAsyncScheduler`` then.
Evicting stays safe: a step is planned before the previous step's requests leave ``running``,
so a cluster evicted at step t+1 was idle at step t, and the worker orders its copy after the
work already queued on the stream.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from vllm_jd.envs import max_resident_clusters, max_wait, scheduler_policy, store_path
from vllm_jd.scheduler.policy import BASE, Request, plan_fcfs, plan_step
from vllm_jd.serving.servable import store_of
from vllm_jd.serving.snapshot import Snapshot
from vllm_jd.store.format import read_manifest
from vllm_jd.vllm_version import check_vllm_version

logger = logging.getLogger(__name__)
EMPTY = -1


class ClusterIndex:
    """LoRA id → cluster of the served store; a miss re-reads the manifest (adapters registered
    while serving get new ids), at most once per step."""

    def __init__(self, store: str):
        self.store = store
        self.by_id: dict[int, int] = {}
        self._names: dict[str, int] = {}
        self.num_clusters = 0
        self.reload()

    def reload(self) -> None:
        manifest = read_manifest(self.store)
        self.version = manifest.generation[:12]
        self._names = {n: a.cluster for n, a in manifest.adapters.items()}
        self.num_clusters = len(manifest.clusters)

    def cluster(self, lora_request, reloaded: list[bool]) -> int:
        if lora_request is None or lora_request.lora_int_id <= 0:
            return BASE
        c = self.by_id.get(lora_request.lora_int_id)
        if c is None:
            if lora_request.lora_name not in self._names and not reloaded[0]:
                self.reload()
                reloaded[0] = True
            c = self._names.get(lora_request.lora_name, BASE)  # unknown: the worker's load will fail it
            self.by_id[lora_request.lora_int_id] = c
        return c


class JDScheduler(Scheduler):
    """vLLM's ``Scheduler`` admitting requests by the cluster plan; see the module docstring."""

    def __new__(cls, *args, **kwargs):
        config = kwargs.get("vllm_config", args[0] if args else None)
        if cls is JDScheduler and config is not None and config.scheduler_config.async_scheduling:
            return super().__new__(JDAsyncScheduler)
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        check_vllm_version()
        super().__init__(*args, **kwargs)
        budget = max_resident_clusters()
        if budget is None:
            raise ValueError("JDScheduler needs a resident cluster budget: VLLM_JD_MAX_RESIDENT_CLUSTERS "
                             "(vllm-jd serve --jd-max-resident-clusters K)")
        self.jd_policy, self.jd_max_wait = scheduler_policy(), max_wait()
        self.jd_index = ClusterIndex(store_path())
        self.jd_table = np.full(budget, EMPTY, dtype=np.int64)
        self.jd_last_used: dict[int, float] = {}
        self.jd_loads = 0
        self._jd_admit: set[str] | None = None
        self._jd_snapshot = Snapshot("scheduler")
        logger.info("vllm-jd scheduler: policy %s, %d resident clusters of %d, max wait %.1f s", self.jd_policy,
                    budget, self.jd_index.num_clusters, self.jd_max_wait)

    def schedule(self, *args, **kwargs):
        self._jd_admit = self._jd_plan()
        try:
            output = super().schedule(*args, **kwargs)
        finally:
            self._jd_admit = None
        # a plain attribute, pickled with the output to the workers; the store names the version
        output.jd_slots = (self.jd_index.store, self.jd_table.copy())
        return output

    def _handle_blocked_waiting_request(self, request) -> bool:
        if not super()._handle_blocked_waiting_request(request):
            return False
        return self._jd_admit is None or request.request_id in self._jd_admit

    def _jd_follow_store_switch(self) -> None:
        """After ``POST /v1/jd/store`` the API server names the new store in every LoRA request
        (``lora_path``); the first such request switches the cluster index and empties the table
        (the workers emptied theirs when they switched)."""
        for r in (*self.waiting, *self.running):
            if r.lora_request is None or not r.lora_request.lora_path:
                continue
            path, version = store_of(r.lora_request.lora_path)
            same_store = path == self.jd_index.store or Path(path).resolve() == Path(self.jd_index.store).resolve()
            if not same_store or (version and version != self.jd_index.version):
                try:
                    index = ClusterIndex(path)
                except (OSError, ValueError):
                    return  # not a store: an offline caller's own path, nothing to follow
                logger.info("vllm-jd scheduler: store %s → %s", self.jd_index.store, path)
                self.jd_index = index
                self.jd_table[:] = EMPTY
                self.jd_last_used.clear()
                return

    def _jd_plan(self) -> set[str]:
        """Decide this step (the policy), apply its evictions and loads to the slot table; returns
        the waiting request ids vLLM may admit."""
        now, reloaded = time.time(), [False]
        self._jd_follow_store_switch()
        # clusters whose loads went out with the last step count as resident from this one on
        resident = {int(c) for c in self.jd_table if c != EMPTY}
        # max_tokens bounds how long a request holds its cluster (the window rule; EOS only shortens it)
        waiting = [Request(r.request_id, self.jd_index.cluster(r.lora_request, reloaded), r.arrival_time,
                           r.max_tokens - r.num_output_tokens) for r in self.waiting]
        running: dict[int, int] = {}
        tails: dict[int, int] = {}
        for r in self.running:
            c = self.jd_index.cluster(r.lora_request, reloaded)
            running[c] = running.get(c, 0) + 1
            tails[c] = max(tails.get(c, 0), r.max_tokens - r.num_output_tokens)
            self.jd_last_used[c] = now
        budget = max(0, self.max_num_running_reqs - len(self.running))
        K = len(self.jd_table)
        if self.jd_policy == "fcfs":
            plan = plan_fcfs(waiting, running, resident, K, self.jd_last_used, budget)
        else:
            # a cluster's copy is short next to a step (CPU: memcpy; GPU: ~1 ms of PCIe for 7B bases at
            # rank 16 against a ~25 ms decode step), so a loaded cluster admits in the same step:
            # waiting a step for it cost 10% requests/s in bench/scheduling.py
            plan = plan_step(waiting, running, resident, set(), K, now, self.jd_max_wait, budget, admit_on_load=True,
                             tails=tails)
        for c in plan.evict:
            self.jd_table[self.jd_table == c] = EMPTY
        for c in plan.load:
            free = np.flatnonzero(self.jd_table == EMPTY)
            if not free.size:  # the policy never loads more than fits; guard the invariant anyway
                raise RuntimeError(f"vllm-jd: no free slot to load cluster {c} (table {self.jd_table.tolist()})")
            self.jd_table[free[0]] = c
        self.jd_loads += len(plan.load)
        if plan.load or plan.evict:
            logger.debug("vllm-jd plan: load %s evict %s drain %s", plan.load, plan.evict, plan.drain)
        self._jd_snapshot.write({"table": self.jd_table.tolist(), "loads": self.jd_loads,
                                 "policy": self.jd_policy}, force=bool(plan.load))
        return set(plan.admit)


class JDAsyncScheduler(JDScheduler, AsyncScheduler):
    """``JDScheduler`` over vLLM's ``AsyncScheduler`` (MRO: ours, then AsyncScheduler, Scheduler)."""
