"""A Hugging Face cache written by hand in the real layout, so offline tests read it exactly as
``huggingface_hub`` reads a cache it filled itself."""

from __future__ import annotations

import hashlib
from pathlib import Path

FILES = ("adapter_config.json", "adapter_model.safetensors")
COMMIT_ONE, COMMIT_ZOO = "a" * 40, "b" * 40


def write_hf_cache(cache_dir: Path, repo_id: str, files: dict[str, bytes], commit: str, ref: str = "main") -> Path:
    """The real cache layout: blobs/<hash>, refs/<ref> → commit, snapshots/<commit>/<path> → blob."""
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    for rel, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("../" * (len(Path(rel).parts) + 1)) / "blobs" / blob.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return repo
