"""Store dtypes (--basis-dtype / --sigma-dtype): int8 codec, errors reported = errors measured on
exported adapters (compress and add), bytes on disk, fp16 overflow, v1 stores still readable."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import TINY_MODULES, dense_update, random_factors

from vllm_jd.cli import main as cli
from vllm_jd.compress.factors import reconstruction_losses
from vllm_jd.compress.report import summarize
from vllm_jd.compress.synthetic import make_adapters
from vllm_jd.store.dtypes import encode, roundtrip
from vllm_jd.store.format import read_manifest

DTYPES = [("bf16", "bf16"), ("fp16", "fp16"), ("int8", "int8"), ("int8", "fp32"), ("fp32", "int8")]


def test_int8_per_channel_scales_and_bound():
    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(123, 8, generator=g, dtype=torch.float64))[0].float()
    t = encode("U.0.m", U, "int8", "basis")
    assert t["U.0.m"].dtype == torch.int8 and t["U.0.m.scale"].shape == (1, 8)
    assert (t["U.0.m"].abs().amax(0) == 127).all()  # every column uses the full range
    back = roundtrip(U, "int8", "basis")
    assert ((back - U).abs() <= t["U.0.m.scale"] / 2 + 1e-7).all()  # round to nearest
    S = torch.randn(5, 8, 8, generator=g)
    S[2] = 0  # an all-zero Σ (an adapter without this module) stays exactly zero
    ts = encode("s", S, "int8", "sigma")
    assert ts["s.scale"].shape == (5, 8, 1)
    assert torch.equal(roundtrip(S, "int8", "sigma")[2], torch.zeros(8, 8))
    assert encode("d", torch.randn(5, 8, generator=g), "int8", "sigma")["d.scale"].shape == (5, 1)


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "int8"])
def test_reconstruction_losses_match_dense(dtype):
    f = random_factors(1, n=5, r=3, d_in=17, d_out=13)
    g = torch.Generator().manual_seed(2)
    U, V = torch.randn(13, 6, generator=g, dtype=torch.float64), torch.randn(17, 6, generator=g, dtype=torch.float64)
    U, V = roundtrip(U, dtype, "basis").double(), roundtrip(V, dtype, "basis").double()  # not orthonormal
    for S in (torch.randn(5, 6, 6, generator=g, dtype=torch.float64), torch.randn(5, 6, generator=g, dtype=torch.float64)):
        Sf = S if S.dim() == 3 else torch.diag_embed(S)
        P = f.Bt.transpose(1, 2) @ f.A
        want = ((P - U @ Sf @ V.T) ** 2).sum((1, 2))
        torch.testing.assert_close(reconstruction_losses(f, U, V, S), want, rtol=1e-10, atol=1e-12)


def _measured_error(src_root, exported, name) -> float:
    num = den = 0.0
    for m in TINY_MODULES:
        p = dense_update(src_root / name, m)
        q = dense_update(exported, m)
        num += float(((p - q) ** 2).sum())
        den += float((p**2).sum())
    return math.sqrt(num / den)


@pytest.mark.parametrize("basis, sigma", DTYPES)
def test_reported_error_is_the_exported_adapters_error(tmp_path, basis, sigma):
    make_adapters(tmp_path / "a", 8, TINY_MODULES, rank=4, structure="shared", seed=3)
    far = make_adapters(tmp_path / "b", 1, TINY_MODULES, rank=4, structure="random", seed=4, prefix="far")[0]
    near = make_adapters(tmp_path / "c", 1, TINY_MODULES, rank=4, structure="shared", seed=3, prefix="near")[0]
    store = tmp_path / "s"
    assert cli(["-q", "compress", str(tmp_path / "a"), "--out", str(store), "--rank", "6", "--clusters", "2",
                "--basis-dtype", basis, "--sigma-dtype", sigma]) == 0
    assert cli(["-q", "add", str(store), str(far), str(near), "--max-error", "0.3"]) == 0
    m = read_manifest(store)
    assert (m.basis_dtype, m.sigma_dtype) == (basis, sigma)
    kinds = {m.clusters[m.adapters[n].cluster].kind for n in ("far-0000", "near-0000")}
    assert kinds == {"exact", "shared"}  # both add paths: a projection and a new (quantised) singleton
    roots = {n: tmp_path / "a" for n in m.adapters} | {"far-0000": tmp_path / "b", "near-0000": tmp_path / "c"}
    for name, info in m.adapters.items():
        assert cli(["-q", "export", str(store), name, "--out", str(tmp_path / "e" / name)]) == 0
        measured = _measured_error(roots[name], tmp_path / "e" / name, name)
        assert info.error == pytest.approx(measured, rel=1e-4, abs=1e-6), name
        assert info.error_fp32 is not None
        # quantisation changes little (its noise is nearly orthogonal to the residual, so error²
        # moves by about its square; it may even lower the error): int8 ≲ 1e-2, bf16/fp16 ≲ 4e-3
        assert math.sqrt(abs(info.error**2 - info.error_fp32**2)) < (1.5e-2 if "int8" in (basis, sigma) else 5e-3)


def test_inspect_reports_bytes_and_added_error(tmp_path):
    make_adapters(tmp_path / "a", 6, TINY_MODULES, rank=4, structure="shared", seed=5)
    sizes = {}
    for dt in ("fp32", "bf16", "int8"):
        assert cli(["-q", "compress", str(tmp_path / "a"), "--out", str(tmp_path / dt), "--rank", "8", "--clusters",
                    "1", "--basis-dtype", dt, "--sigma-dtype", dt]) == 0
        sizes[dt] = summarize(tmp_path / dt)
    params_b = sum(8 * (d_in + d_out) for d_in, d_out in TINY_MODULES.values())
    params_s = 6 * 8 * 8 * len(TINY_MODULES)
    assert sizes["fp32"]["bytes_stored"] == {"bases": 4 * params_b, "sigma": 4 * params_s, "total": 4 * (params_b + params_s)}
    assert sizes["bf16"]["bytes_stored"]["total"] == 2 * (params_b + params_s)
    n_scales = 2 * 8 * len(TINY_MODULES)  # one per column of each U and V
    assert sizes["int8"]["bytes_stored"]["bases"] == params_b + 4 * n_scales
    assert sizes["int8"]["bytes_stored"]["sigma"] == params_s + 4 * 6 * 8 * len(TINY_MODULES)
    assert sizes["fp32"]["error_added_by_dtypes"] is None
    q = sizes["int8"]["error_added_by_dtypes"]
    assert 0 < q["mean"] <= q["max"] < 0.02
    assert json.loads(json.dumps(sizes["int8"]))  # JSON-ready


def test_fp16_overflow_is_refused_with_a_reason(tmp_path):
    make_adapters(tmp_path / "a", 2, TINY_MODULES, rank=4, structure="random", seed=6, alpha=4e6)
    rc = cli(["-q", "compress", str(tmp_path / "a"), "--out", str(tmp_path / "s"), "--rank", "4", "--clusters", "1",
              "--sigma-dtype", "fp16"])
    assert rc == 2 and not (tmp_path / "s").exists()


def test_version_1_store_still_reads(tmp_path):
    make_adapters(tmp_path / "a", 3, TINY_MODULES, rank=4, structure="shared", seed=7)
    store = tmp_path / "s"
    assert cli(["-q", "compress", str(tmp_path / "a"), "--out", str(store), "--rank", "4", "--clusters", "1"]) == 0
    raw = json.loads((store / "manifest.json").read_text())
    raw["format_version"] = 1
    for k in ("basis_dtype", "sigma_dtype"):
        raw.pop(k)
    for a in raw["adapters"].values():
        a.pop("error_fp32")
    (store / "manifest.json").write_text(json.dumps(raw))
    m = read_manifest(store)
    assert m.format_version == 1 and (m.basis_dtype, m.sigma_dtype) == ("fp32", "fp32")
    assert cli(["-q", "export", str(store), "adapter-0000", "--out", str(tmp_path / "e")]) == 0
    raw["format_version"] = 3
    (store / "manifest.json").write_text(json.dumps(raw))
    assert cli(["-q", "inspect", str(store)]) == 2
