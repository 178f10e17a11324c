"""Which adapters of a store a server serves: those ``validate.check_store`` finds nothing wrong with.

No vLLM import here. Checked in the API server process, every value read, once per store version
(``vllm-jd serve`` before vLLM starts, then again only if the manifest changed): a store-wide
problem refuses the store (``vllm-jd serve`` exits 2 with the reason); an adapter with a problem
is left out of the model names, with a warning naming it, and the others are served. The workers
check what they load the same way (``bank``), so neither side serves what the other refused.
"""

from __future__ import annotations

import logging
from pathlib import Path

from vllm_jd.envs import store_path
from vllm_jd.store.format import MANIFEST, Manifest, read_manifest
from vllm_jd.store.validate import Findings, check_store

logger = logging.getLogger(__name__)
_checked: dict[tuple, tuple[Manifest, Findings]] = {}


def servable(store: str | Path) -> tuple[Manifest, Findings]:
    """(the manifest with every adapter that has a problem set aside, what was found); StoreError
    if the store cannot be served at all."""
    path = Path(store)
    if not (path / MANIFEST).is_file():
        read_manifest(path)  # raises the StoreError that names what is wrong
    st = (path / MANIFEST).stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size, st.st_ino)
    if key not in _checked:
        manifest = read_manifest(path)
        found = check_store(path, manifest)
        found.refuse_store(store)
        found.set_aside(manifest)
        if found.adapters:
            logger.warning("%d adapters of %s are not served (`vllm-jd fsck %s` lists them, --repair quarantines "
                           "them): %s", len(found.adapters), store, store,
                           "; ".join(f"{n}: {w}" for n, w in sorted(found.adapters.items())[:5]))
        _checked.clear()
        _checked[key] = manifest, found
    return _checked[key]


def lora_path(store: str | Path, generation: str, cluster: int, block: int, row: int) -> str:
    """The ``lora_path`` of a store adapter's LoRA request: ``STORE#version.cluster.block.row``.

    The workers read adapters from the store by name and ignore it; vLLM's prefix cache keys
    blocks by (name, path), so the path must change whenever what a name serves changes (a name
    deleted and registered again with other weights, a new store version) or cached KV computed
    with the old weights would be reused for the new ones."""
    return f"{store}#{generation[:12]}.{cluster}.{block}.{row}"


def store_of(path: str) -> tuple[str, str]:
    """(store, version) of a ``lora_path`` made by ``lora_path`` (a bare path: version "")."""
    store, _, rest = path.partition("#")
    return store, rest.split(".", 1)[0]


def register_store_adapters(models) -> int:
    """Add every adapter of the store to ``models.lora_requests`` (``OpenAIServingModels``): at
    start (``patch``) and after a store switch (``admin``)."""
    from vllm.lora.request import LoRARequest

    store = store_path()
    manifest, _ = servable(store)  # adapters with a problem are left out (a warning names them)
    start = models.lora_id_counter.inc(len(manifest.adapters)) - len(manifest.adapters)
    models.jd_generation = manifest.generation  # registrations add to this version only
    for i, (name, a) in enumerate(manifest.adapters.items()):
        if models.is_base_model(name):
            raise ValueError(f"store adapter {name!r} has the name of the base model; rename it")
        path = lora_path(store, manifest.generation, a.cluster, a.block, a.row)
        models.lora_requests[name] = LoRARequest(lora_name=name, lora_int_id=start + i + 1, lora_path=path)
    models.jd_ids = {name: {r.lora_int_id} for name, r in models.lora_requests.items()}  # ids the workers may hold
    logger.info("vllm-jd: %d adapters of %s are model names", len(manifest.adapters), store)
    return len(manifest.adapters)
