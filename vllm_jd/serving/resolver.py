"""On-demand registration: a request for an unknown model name that is an allowed Hub id or URL
(``sources.allow``) fetches the adapter, adds it to the store as ``vllm-jd add`` would, and is
served, through vLLM's own resolver mechanism (``LoRAResolver``, asked by vLLM's
``OpenAIServingModels.resolve_lora`` when runtime LoRA updating is on).

vLLM holds one lock per name around its resolvers, so 16 concurrent first requests fetch and
register once; ``patch`` wraps ``resolve_lora`` to take vllm-jd's per-name registration lock first
(the order ``/v1/load_lora_adapter`` uses), count the outcome, and take the adapter out of the
store again if the workers cannot load it. Errors reach the client with their reason:
404 when the source has no adapter, 400 for a bad adapter, 503 when registrations are busy.
Names not allowed return None (vLLM's 404) and fetch nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass, field
from http import HTTPStatus

from vllm.exceptions import GracefulHTTPError
from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver

from vllm_jd.sources.allow import resolvable
from vllm_jd.sources.fetch import Fetched, fetch_one
from vllm_jd.sources.spec import Source
from vllm_jd.store.errors import AdapterError

logger = logging.getLogger(__name__)
FAILURE_TTL_S = 10.0
"""A name whose resolution failed answers the same error for this long without fetching again
(every waiter behind vLLM's per-name lock would otherwise fetch it once more)."""
FETCH_WORKERS = 4
"""Fetches at once (downloads of distinct names; the same name is fetched once, under vLLM's lock)."""
CURRENT_MODELS: ContextVar = ContextVar("vllm_jd_serving_models", default=None)
"""vLLM's serving-models object of the resolution in progress (set by ``patch``'s wrapper)."""


@dataclass
class Resolution:
    """What one resolution did, for ``patch``'s wrapper: outcome, the store entry, phase seconds."""

    name: str
    source: Source
    outcome: str = "failed"
    added: object | None = None
    seconds: dict[str, float] = field(default_factory=dict)


Register = Callable[[object, str, Fetched], Awaitable[object]]
"""(serving models, name, fetched adapter) → ``Added``, or vLLM's error response."""


class JDResolver(LoRAResolver):
    """Fetch + register + the store path of the new entry, as a LoRARequest."""

    def __init__(self, kinds: frozenset[str], patterns: list[str], register: Register,
                 lora_path: Callable[[object, object], str]):
        self.kinds, self.patterns = kinds, patterns
        self.register, self.lora_path = register, lora_path
        self.pool = ThreadPoolExecutor(max_workers=FETCH_WORKERS, thread_name_prefix="vllm-jd-fetch")
        self.done: dict[str, Resolution] = {}
        self.failed: dict[str, tuple[float, GracefulHTTPError]] = {}

    def wants(self, name: str) -> bool:
        """Whether ``name`` is one this resolver would fetch (allowed Hub id or URL)."""
        return resolvable(name, self.kinds, self.patterns) is not None

    def take(self, name: str) -> Resolution | None:
        """The resolution of ``name`` that just ran (once), or None if this resolver did not try."""
        return self.done.pop(name, None)

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        source = resolvable(lora_name, self.kinds, self.patterns)
        if source is None:
            return None
        if (failed := self.failed.get(lora_name)) is not None and failed[0] > time.monotonic():
            raise failed[1]
        res = self.done[lora_name] = Resolution(lora_name, source)
        try:
            added = await self._fetch_and_add(res, CURRENT_MODELS.get())
        except GracefulHTTPError as e:
            if e.http_status != HTTPStatus.SERVICE_UNAVAILABLE:  # busy is no answer about the adapter
                self.failed[lora_name] = (time.monotonic() + FAILURE_TTL_S, e)
            raise
        self.failed.pop(lora_name, None)
        res.added = added
        return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=self.lora_path(CURRENT_MODELS.get(), added))

    async def fetch_for(self, name: str, text: str) -> Fetched:
        """The allowed source ``text`` fetched for ``/v1/load_lora_adapter`` (name ``name``);
        GracefulHTTPError as for a resolution."""
        source = resolvable(text, self.kinds, self.patterns)
        if source is None:
            raise GracefulHTTPError(f"{text!r} is not an allowed source", HTTPStatus.FORBIDDEN)
        return await self._fetch(Resolution(name, source))

    async def _fetch_and_add(self, res: Resolution, models):
        fetched = await self._fetch(res)
        t0 = time.perf_counter()
        added = await self.register(models, res.name, fetched)
        res.seconds["add"] = time.perf_counter() - t0
        if not hasattr(added, "cluster"):  # vLLM's error response (busy, timed out, bad adapter)
            raise GracefulHTTPError(added.error.message, HTTPStatus(added.error.code))
        logger.info("vllm-jd: resolved %s from %s (%s): cluster %d, error %.4f, fetch %.2f s, add %.2f s",
                    res.name, fetched.recorded, added.kind, added.cluster, added.error, res.seconds["fetch"],
                    res.seconds["add"])
        return added

    async def _fetch(self, res: Resolution) -> Fetched:
        t0 = time.perf_counter()
        try:
            got = await asyncio.get_running_loop().run_in_executor(self.pool, fetch_one, res.source)
        except AdapterError as e:
            res.outcome = "not_found"
            raise GracefulHTTPError(f"{res.name!r} could not be fetched: {e}", HTTPStatus.NOT_FOUND) from None
        except (ValueError, OSError) as e:
            raise GracefulHTTPError(f"{res.name!r} could not be fetched: {e}", HTTPStatus.BAD_REQUEST) from None
        finally:
            res.seconds["fetch"] = time.perf_counter() - t0
        if len(got) != 1:
            names = ", ".join(f.name for f in got[:4])
            raise GracefulHTTPError(f"{res.name!r} holds {len(got)} adapters, not one; request one of them by name "
                                    f"({names}{', …' if len(got) > 4 else ''})", HTTPStatus.BAD_REQUEST)
        return got[0]
