"""Parameter accounting reproduces the paper's "Para. Saved" cells (d = 4096, rank-16 LoRAs)."""

import pytest

from vllm_jd.compress.accounting import account
from vllm_jd.store.format import AdapterInfo, ClusterInfo, Manifest, ModuleInfo

D, R_LORA = 4096, 16


def paper_manifest(n: int, rank: int, clusters: int, method: str) -> Manifest:
    kind = "svd" if method == "svd" else "shared"
    k = n if method == "svd" else clusters
    return Manifest(
        method=method, sigma="full" if method == "jd-full" else "diag", rank=rank,
        modules=[ModuleInfo(name="m", d_in=D, d_out=D)],
        clusters=[ClusterInfo(id=c, rank=rank, kind=kind) for c in range(k)],
        adapters={f"a{i}": AdapterInfo(cluster=i % k, block=0, row=i // k, rank=R_LORA, lora_params=R_LORA * 2 * D,
                                       checksum="", source="", error=0.0, module_errors=[0.0]) for i in range(n)})


@pytest.mark.parametrize("n, rank, clusters, method, per, total", [
    (10, 256, 1, "jd-full", 0.50, -1.10),   # Table cell "10 F256"
    (500, 16, 25, "jd-full", 1.00, 0.95),   # "16 C 25"
    (500, 64, 7, "jd-full", 0.97, 0.91),    # "64 C 7"
    (500, 256, 1, "jd-diag", 1.00, 0.97),   # "500 D256"
    (100, 16, 7, "jd-full", 1.00, 0.93),    # "100 16C7"
    (500, 64, 5, "jd-full", 0.97, 0.93),    # "500 64C5"
    (10, 4, 1, "svd", 0.75, 0.75),          # SVD-4: 1 − r/16
])
def test_paper_para_saved(n, rank, clusters, method, per, total):
    acc = account(paper_manifest(n, rank, clusters, method))
    assert round(sum(acc.per_adapter_saved) / n, 2) == per
    assert round(acc.total_saved, 2) == total


def test_only_the_modules_an_adapter_has_count():
    """An attention-only adapter stored exactly holds no MLP basis and no MLP Σ: neither is charged."""
    r, (d_attn, d_mlp) = 8, (256, 384)
    manifest = Manifest(
        method="jd-full", sigma="full", rank=16,
        modules=[ModuleInfo(name="q", d_in=128, d_out=128), ModuleInfo(name="up", d_in=128, d_out=256)],
        clusters=[ClusterInfo(id=0, rank=16, kind="shared"), ClusterInfo(id=1, rank=r, kind="exact")],
        adapters={"full": AdapterInfo(cluster=0, block=0, row=0, rank=16, lora_params=16 * (d_attn + d_mlp),
                                      checksum="", source="", error=0.1, module_errors=[0.1, 0.1]),
                  "attn": AdapterInfo(cluster=1, block=0, row=0, rank=r, lora_params=r * d_attn,
                                      checksum="", source="", error=0.0, module_errors=[0.0, None])})
    acc = account(manifest)
    assert acc.basis_params == [16 * (d_attn + d_mlp), r * d_attn]
    assert acc.sigma_params == [2 * 16 * 16, r * r]
    assert acc.per_adapter_saved[1] == pytest.approx(1 - (r * r + r * d_attn) / (r * d_attn))
    used = 16 * (d_attn + d_mlp) + r * d_attn + 2 * 256 + r * r
    assert acc.total_saved == pytest.approx(1 - used / (16 * (d_attn + d_mlp) + r * d_attn))
