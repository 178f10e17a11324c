"""Registration reads only under the adapter root, even when the folder changes under it: a symlink
swapped in after the path was checked is refused, not followed; a FIFO is refused, not waited on.
(No server: ``registration`` is plain Python.)"""

from __future__ import annotations

import os
import threading

import pytest
from helpers import TINY_MODULES

from vllm_jd.compress.synthetic import make_adapters
from vllm_jd.serving.registration import copy_under_root, resolve_under_root


@pytest.fixture
def root(tmp_path):
    make_adapters(tmp_path / "root" / "team", 1, TINY_MODULES, rank=4, prefix="good")
    make_adapters(tmp_path / "outside", 1, TINY_MODULES, rank=4, prefix="secret")
    return tmp_path


def test_a_symlink_swapped_in_after_the_check_is_not_followed(root):
    base = root / "root"
    real = resolve_under_root("team/good-0000", str(base))  # checked: inside the root
    os.rename(base / "team", base / "team.old")  # then an attacker swaps a folder on the path for a link
    (base / "team").symlink_to(root / "outside", target_is_directory=True)
    os.rename(root / "outside" / "secret-0000", root / "outside" / "good-0000")
    (root / "into").mkdir()
    with pytest.raises(PermissionError, match="symlink"):
        copy_under_root(real, str(base), root / "into")
    assert not any((root / "into").iterdir())  # nothing of the outside file was read


def test_a_symlinked_file_is_refused(root):
    base = root / "root"
    f = base / "team" / "good-0000" / "adapter_model.safetensors"
    f.unlink()
    f.symlink_to(root / "outside" / "secret-0000" / "adapter_model.safetensors")
    real = resolve_under_root("team/good-0000", str(base))
    (root / "into").mkdir()
    with pytest.raises(PermissionError, match="symlinks are refused"):
        copy_under_root(real, str(base), root / "into")


def test_a_fifo_is_refused_without_blocking(root):
    base = root / "root"
    f = base / "team" / "good-0000" / "adapter_model.safetensors"
    f.unlink()
    os.mkfifo(f)  # opening it for reading would wait for a writer forever
    real = resolve_under_root("team/good-0000", str(base))
    (root / "into").mkdir()
    result = {}

    def copy():
        try:
            copy_under_root(real, str(base), root / "into")
        except ValueError as e:
            result["error"] = str(e)

    t = threading.Thread(target=copy, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive() and "not a regular file" in result["error"]


def test_paths_outside_the_root_are_refused(root):
    base = root / "root"
    for path in ("../outside/secret-0000", str(root / "outside" / "secret-0000"), "/etc"):
        with pytest.raises(PermissionError, match="outside the adapter root"):
            resolve_under_root(path, str(base))


def test_oversized_and_hard_linked_files_are_refused(root):
    from vllm_jd.serving.registration import weights_limit

    base = root / "root"
    adapter = base / "team" / "good-0000"

    class Store:  # the module table of a store for TINY_MODULES
        modules = [type("M", (), {"d_in": d_in, "d_out": d_out}) for d_in, d_out in TINY_MODULES.values()]

    limit = weights_limit(Store, adapter / "adapter_config.json")
    assert (adapter / "adapter_model.safetensors").stat().st_size < limit < 1 << 24
    big = root / "big"
    big.mkdir()
    (big / "adapter_config.json").write_bytes((adapter / "adapter_config.json").read_bytes())
    with open(big / "adapter_model.safetensors", "wb") as f:
        f.truncate(6 << 30)  # a sparse 6 GiB file: refused before a byte is copied
    os.rename(big, base / "big")
    (root / "into").mkdir()
    with pytest.raises(ValueError, match="more than an adapter of its rank"):
        copy_under_root(resolve_under_root("big", str(base)), str(base), root / "into", Store)
    os.link(root / "outside" / "secret-0000" / "adapter_model.safetensors", adapter / "linked.safetensors")
    os.replace(adapter / "linked.safetensors", adapter / "adapter_model.safetensors")
    (root / "into2").mkdir()
    with pytest.raises(PermissionError, match="hard links"):
        copy_under_root(resolve_under_root("team/good-0000", str(base)), str(base), root / "into2", Store)
