"""ComPEFT: count rule, ±c values, top-k property, bit-exact codecs, sizes, bit ops, adapter level."""

import math

import numpy as np
import pytest
import torch

from vllm_jd.store.compeft import (
    Ternary,
    compeft,
    compeft_adapter,
    decode_adapter,
    entropy_bits,
    flatten,
    golomb_expected_bits,
    keep_count,
    unflatten,
)
from vllm_jd.store.ternary_codec import (
    decode_golomb,
    decode_masks,
    encode_golomb,
    encode_masks,
    golomb_bits,
    golomb_parameter,
    hamming,
    mask_bits,
    ternary_dot,
)


def randn(d, seed=0, dtype=torch.float32):
    return torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("d,k,code,exact", [(100, 0.05, 6, 5), (1000, 0.05, 51, 50), (12345, 0.2, 2470, 2469),
                                            (10, 1.0, 10, 10), (3, 0.1, 1, 0)])
def test_keep_count_code_and_exact_rule(d, k, code, exact):
    assert keep_count(d, k) == code
    assert keep_count(d, k, "exact") == exact
    tau = randn(d, seed=d)  # continuous: no zeros, no ties
    assert compeft(tau, k, 1.0).nnz == code
    assert compeft(tau, k, 1.0, rounding="exact").nnz == exact


@pytest.mark.parametrize("alpha", [0.5, 1.0, 3.0])
def test_kept_entries_are_signed_fp16_scale(alpha):
    tau = randn(5000, seed=1) * 0.013
    t = compeft(tau, 0.1, alpha)
    c = float(np.float16(alpha * tau.double().std().item()))
    assert t.scale == c and float(np.float16(t.scale)) == t.scale
    dense = t.dense(torch.float64)
    kept = dense != 0
    assert int(kept.sum()) == keep_count(5000, 0.1)
    assert torch.equal(dense[kept].abs(), torch.full((int(kept.sum()),), c, dtype=torch.float64))
    assert torch.equal(torch.sign(dense[kept]), torch.sign(tau[kept]).double())  # signs preserved
    assert torch.equal(dense[~kept], torch.zeros(int((~kept).sum()), dtype=torch.float64))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [0.01, 0.05, 0.3])
def test_kept_magnitudes_dominate_dropped(seed, k):
    tau = randn(3001, seed=seed)
    tau[::7] = tau[3]  # plant many ties, some of them at the threshold for some seeds
    t = compeft(tau, k, 1.0)
    kept = t.pos | t.neg
    assert int(kept.sum()) == keep_count(3001, k)  # ties never add entries
    assert tau[~kept].abs().max() <= tau[kept].abs().min()  # the official code's assert


def test_ties_broken_by_lowest_index_and_zeros_unsigned():
    tau = torch.tensor([1.0, -1.0, 1.0, 1.0, 0.5, 0.0, 0.0, 0.0])
    t = compeft(tau, 0.25, 1.0, rounding="exact")  # keeps 2 of the four |1|'s: the first two
    assert t.pos.tolist() == [True, False, False, False, False, False, False, False]
    assert t.neg.tolist() == [False, True, False, False, False, False, False, False]
    z = compeft(torch.zeros(10), 0.5, 2.0)  # kept zeros have sign 0: in neither mask
    assert z.nnz == 0 and z.scale == 0.0


def _vectors():
    for d in (1, 7, 1000, 12345, 4099):
        for k in (0.01, 0.05, 0.2, 0.5, 1.0):
            yield d, k, randn(d, seed=d) * 0.02
    yield 12345, 0.1, torch.zeros(12345)
    yield 9, 0.3, torch.zeros(9)


@pytest.mark.parametrize("d,k,tau", list(_vectors()), ids=lambda x: None if torch.is_tensor(x) else str(x))
def test_codecs_round_trip_bit_exact(d, k, tau):
    t = compeft(tau, k, 2.0)
    m = encode_masks(t)
    assert len(m) == 2 + 2 * math.ceil(d / 8) and mask_bits(d) == 2 * d + 16
    g = encode_golomb(t)
    assert len(g) == 11 + math.ceil((golomb_bits(t) - 16) / 8)
    for back in (decode_masks(m, d), decode_golomb(g, d)):
        assert torch.equal(back.pos, t.pos) and torch.equal(back.neg, t.neg) and back.scale == t.scale
        assert torch.equal(back.dense(), t.dense())


def test_codecs_reject_malformed_payloads():
    t = compeft(randn(100), 0.1, 1.0)
    m, g = encode_masks(t), encode_golomb(t)
    with pytest.raises(ValueError, match="d=200"):
        decode_masks(m, 200)
    with pytest.raises(ValueError, match="padding"):
        decode_masks(m[:14] + b"\x01" + m[15:], 100)  # last pos byte: bits beyond entry 99 are padding
    with pytest.raises(ValueError, match="does not match|truncated"):
        decode_golomb(g[:-2], 100)
    both = bytearray(m)
    both[2 + 13] |= 0x80  # set a neg bit where pos is set (entry 0 is in one of the masks)
    both[2] |= 0x80
    with pytest.raises(ValueError, match="overlap"):
        decode_masks(bytes(both), 100)


@pytest.mark.parametrize("k", [0.05, 0.1])
def test_golomb_size_matches_footnote_formula(k):
    d = 10**6
    t = compeft(randn(d, seed=3), k, 1.0)
    bits = golomb_bits(t)
    expected = golomb_expected_bits(d, k)
    assert abs(bits - expected) / expected < 0.02, (bits, expected)
    assert abs(bits - entropy_bits(d, k)) / entropy_bits(d, k) < 0.03
    assert bits < mask_bits(d)
    assert golomb_parameter(k) == {0.05: 4, 0.1: 3}[k]


def test_size_formulas_match_paper_numbers():
    # §2.2: "at k = 0.05 … 0.34 * d + 16 bits"; notes' table for b* and Golomb bits/param.
    assert entropy_bits(10**6, 0.05) == pytest.approx(0.3364e6 + 16, rel=1e-3)
    assert entropy_bits(10, 1.0) == 10 + 16
    for k, b, per_param in [(0.01, 6, 0.0911), (0.2, 2, 0.9388), (0.5, 0, 1.5)]:
        assert golomb_parameter(k) == b
        assert (golomb_expected_bits(10**6, k) - 16) / 10**6 == pytest.approx(per_param, abs=1e-4)


def test_ternary_dot_and_hamming_match_dense_signs():
    d = 1237
    ta, tb = compeft(randn(d, 5), 0.3, 1.0), compeft(randn(d, 6), 0.4, 2.0)
    sa, sb = ta.dense() / ta.scale, tb.dense() / tb.scale
    ma, mb = encode_masks(ta), encode_masks(tb)
    assert ternary_dot(ma, mb, d) == int((sa * sb).sum())
    assert ternary_dot(ma, ma, d) == ta.nnz
    assert ternary_dot(ma, mb, d) * ta.scale * tb.scale == pytest.approx(float(ta.dense(torch.float64)
                                                                               @ tb.dense(torch.float64)))
    assert hamming(ma, mb, d) == int((sa - sb).abs().sum()) and hamming(ma, ma, d) == 0


def _lora(seed):
    g = torch.Generator().manual_seed(seed)
    return {"layers.0.q_proj": (torch.randn(4, 16, generator=g), torch.randn(24, 4, generator=g) * 0.1),
            "layers.0.v_proj": (torch.randn(4, 16, generator=g), torch.randn(8, 4, generator=g) * 0.1),
            "layers.1.q_proj": (torch.randn(2, 16, generator=g), torch.randn(24, 2, generator=g) * 0.1)}


def test_adapter_level_round_trip_and_delta_w():
    factors = _lora(0)
    t, layout = compeft_adapter(factors, 0.2, 1.5)
    d = sum(a.numel() + b.numel() for a, b in factors.values())
    assert t.d == d and t.nnz == keep_count(d, 0.2)
    flat, _ = flatten({f"{m}.lora_{w}": x for m, (a, b) in factors.items() for w, x in (("A", a), ("B", b))})
    assert t.scale == float(np.float16(1.5 * flat.double().std().item()))  # one global σ
    out = decode_adapter(decode_golomb(encode_golomb(t), d), layout)
    assert out.keys() == factors.keys()
    c = t.scale
    for m, (a, b) in factors.items():
        a2, b2 = out[m]
        assert a2.shape == a.shape and b2.shape == b.shape
        for x, x2 in ((a, a2), (b, b2)):
            assert set(x2.unique().tolist()) <= {-c, 0.0, c}
            assert torch.equal(torch.sign(x2), torch.sign(x) * (x2 != 0))
        ta, tb = torch.sign(a2), torch.sign(b2)
        assert torch.allclose(b2 @ a2, c * c * (tb @ ta), rtol=1e-6, atol=0)


def test_flatten_unflatten_round_trip_sorted():
    tensors = {"z": torch.arange(6.0).reshape(2, 3), "a": torch.tensor([7.0]), "m": torch.ones(2, 2, 1)}
    flat, layout = flatten(tensors)
    assert [k for k, _ in layout] == ["a", "m", "z"] and flat[:3].tolist() == [7.0, 1.0, 1.0]
    back = unflatten(flat, layout)
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)
    with pytest.raises(ValueError, match="11"):
        unflatten(flat[:-1], layout)


@pytest.mark.parametrize("density,needle", [(0, "density 0 "), (-1, "density -1 "), (5, "pass 0.05 for 5%"),
                                            (float("nan"), "density nan")])
def test_bad_density_named(density, needle):
    with pytest.raises(ValueError, match="not in \\(0, 1\\]") as e:
        compeft(randn(10), density, 1.0)
    assert needle in str(e.value)
    with pytest.raises(ValueError, match=needle.strip()):
        keep_count(10, density)


@pytest.mark.parametrize("alpha", [0, -1.0, float("inf")])
def test_bad_alpha_named(alpha):
    with pytest.raises(ValueError, match=f"alpha {alpha!r}"):
        compeft(randn(10), 0.1, alpha)


def test_bad_ternary_and_rounding():
    with pytest.raises(ValueError, match="overlap"):
        Ternary(torch.tensor([True]), torch.tensor([True]), 1.0)
    with pytest.raises(ValueError, match="0.1"):
        Ternary(torch.tensor([True]), torch.tensor([False]), 0.1)  # not an fp16 value
    with pytest.raises(ValueError, match="'nearest'"):
        keep_count(10, 0.5, "nearest")
