"""Switching a running server to another store version: ``POST /v1/jd/store`` (``vllm-jd serve --jd-admin``).

The paper recompresses every few hours (``vllm-jd compress --from-store STORE --out NEW``); this
route then moves the server to NEW without a restart:

1. NEW is checked: a store folder next to the served one (same parent folder, symlinks resolved:
   the route reads no other path), for the same model modules;
2. new requests wait at a gate; requests in flight finish on the old store (up to
   ``timeout_s``, default 60; if they do not, the gate opens again and the answer is 503);
3. every worker replaces bases and Σ between steps (``collective_rpc("jd_switch_store")``), the
   API server registers NEW's adapter names under new LoRA ids, and the scheduler follows the
   first request naming NEW;
4. the gate opens: waiting requests run on NEW (one naming an adapter NEW lacks gets a 400).

``GET /v1/jd/store`` reports the served store. The routes are a vLLM endpoint plugin
(``vllm.endpoint_plugins``), which vLLM loads only when ``VLLM_PLUGINS`` names it: ``--jd-admin``
does that.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from http import HTTPStatus
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from vllm_jd.envs import VLLM_JD_STORE, store_path
from vllm_jd.serving.servable import servable, store_of
from vllm_jd.store.format import read_manifest

logger = logging.getLogger(__name__)
DEFAULT_TIMEOUT_S = 60.0


class StoreSwitch:
    """The gate in front of the engine and the switch itself (one per API server process)."""

    def __init__(self, engine_client, models):
        self.engine_client, self.models = engine_client, models
        self._open = asyncio.Event()
        self._open.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._in_flight = 0
        self._lock = asyncio.Lock()

    async def enter(self, lora_request):
        """Called for every request before it reaches the engine; returns its LoRA request for
        the store now served (resolved again by name when a switch happened meanwhile)."""
        await self._open.wait()
        if lora_request is not None and store_of(lora_request.lora_path) != self._served():
            current = self.models.lora_requests.get(lora_request.lora_name)
            if current is None or store_of(current.lora_path) != self._served():
                raise ValueError(f"adapter {lora_request.lora_name!r} is not in the store now served "
                                  f"({store_path()})")
            lora_request = current
        self._in_flight += 1
        self._idle.clear()
        return lora_request

    def _served(self) -> tuple[str, str]:
        return store_path(), (getattr(self.models, "jd_generation", "") or "")[:12]

    def exit(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()

    async def switch(self, path: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> dict:
        """Switch to the store at ``path``; ValueError for a bad store, TimeoutError if requests in
        flight do not finish within ``timeout_s``."""
        async with self._lock:
            new = check_new_store(path, store_path(), getattr(self.models, "jd_generation", None))
            t0 = time.perf_counter()
            self._open.clear()
            try:
                await asyncio.wait_for(self._idle.wait(), timeout_s)
                drained = time.perf_counter() - t0
                results = await self.engine_client.collective_rpc("jd_switch_store", args=(str(new),))
                old = store_path()
                os.environ[VLLM_JD_STORE] = str(new)
                for name in [n for n, r in self.models.lora_requests.items() if store_of(r.lora_path)[0] == old]:
                    del self.models.lora_requests[name]
                from vllm_jd.serving.metrics import metrics
                from vllm_jd.serving.servable import register_store_adapters

                register_store_adapters(self.models)
                metrics(str(new)).switch(str(new))
            finally:
                self._open.set()
            logger.info("vllm-jd: now serving %s (drained in %.2f s, switched in %.2f s)", new, drained,
                        time.perf_counter() - t0 - drained)
            return {**results[0], "drain_s": round(drained, 3), "switch_s": round(time.perf_counter() - t0 - drained, 3)}


def check_new_store(path: str, current: str, served_generation: str | None = None) -> Path:
    """The store at ``path`` as a resolved path; ValueError unless it lies in the served store's
    folder (or is the served store recompressed in place: another version than ``served_generation``),
    can be served (``servable``) and fits the model modules the server was started for."""
    if not path:
        raise ValueError("give the new store's path: {\"store\": PATH}")
    new, cur = Path(path).resolve(), Path(current).resolve()
    if new.parent != cur.parent and new != cur:
        raise PermissionError(f"{path}: a new store version must lie in {cur.parent} (next to the served store)")
    manifest, served = servable(new)[0], read_manifest(cur)
    if new == cur and manifest.generation == served_generation:
        raise ValueError(f"{path} is the store already served (same version)")
    leaves = {m.name.rsplit(".", 1)[-1] for m in served.modules}
    dims = {m.name: (m.d_in, m.d_out) for m in served.modules}
    for m in manifest.modules:
        if m.name.rsplit(".", 1)[-1] not in leaves:
            raise ValueError(f"{path}: module {m.name} is of a kind the server was not started with ({sorted(leaves)})")
        if m.name in dims and dims[m.name] != (m.d_in, m.d_out):
            raise ValueError(f"{path}: module {m.name} maps {m.d_in}→{m.d_out}, the served store "
                             f"{dims[m.name][0]}→{dims[m.name][1]}: built for another model")
    return new


_switch: StoreSwitch | None = None


def current() -> StoreSwitch | None:
    """This API server's switch, or None when the admin routes are off."""
    return _switch


def _error(message: str, status: HTTPStatus) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": status.phrase, "code": int(status)}}, int(status))


class AdminPlugin:
    """vLLM endpoint plugin (entry point ``vllm_jd_admin``) adding ``/v1/jd/store``."""

    name = "vllm_jd_admin"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        router = APIRouter()

        @router.get("/v1/jd/store")
        async def served_store() -> JSONResponse:
            manifest = read_manifest(store_path())
            return JSONResponse({"store": store_path(), "adapters": len(manifest.adapters),
                                 "clusters": len(manifest.clusters)})

        @router.post("/v1/jd/store")
        async def switch_store(raw: Request) -> JSONResponse:
            if _switch is None:
                return _error("the engine is not ready", HTTPStatus.SERVICE_UNAVAILABLE)
            try:
                body = await raw.json()
                timeout = float(body.get("timeout_s", DEFAULT_TIMEOUT_S))
                return JSONResponse(await _switch.switch(str(body.get("store") or ""), timeout))
            except PermissionError as e:
                return _error(str(e), HTTPStatus.FORBIDDEN)
            except TimeoutError:
                return _error("requests in flight did not finish in time; the old store is still served",
                              HTTPStatus.SERVICE_UNAVAILABLE)
            except (ValueError, OSError, AttributeError) as e:  # StoreError is a ValueError
                return _error(str(e), HTTPStatus.BAD_REQUEST)

        app.include_router(router)

    async def init_state(self, engine_client, state, args) -> None:
        global _switch
        if engine_client is not None and store_path() is not None:
            _switch = StoreSwitch(engine_client, state.openai_serving_models)
