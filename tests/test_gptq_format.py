"""GPTQ checkpoint tensors: packing against an unpacker written independently from the format spec
(../shared/FORMATS.md section 1), zero-point conventions, dequantization and round-to-nearest."""

import pytest
import torch

from lightllm import functional as F
from lightllm.quantization import (
    detect_zero_convention,
    pack_gptq,
    pack_int,
    quantize_rtn,
    unpack_gptq,
    unpack_int,
)

BITS = [2, 3, 4, 8]


def spec_unpack_column(words: list[int], bits: int) -> list[int]:
    """Values of one packed column, read the way the spec describes it, with Python ints."""
    words = [w & 0xFFFFFFFF for w in words]
    out = []
    if bits == 3:
        for c in range(0, len(words), 3):
            w0, w1, w2 = words[c:c + 3]
            vals = [(w0 >> (3 * j)) & 7 for j in range(10)]                    # values 0..9
            vals.append(((w0 >> 30) & 3) | ((w1 & 1) << 2))                    # value 10: 2 low bits + bit 2
            vals += [(w1 >> (3 * (j - 11) + 1)) & 7 for j in range(11, 21)]    # values 11..20
            vals.append(((w1 >> 31) & 1) | ((w2 & 3) << 1))                    # value 21: bit 0 + bits 1..2
            vals += [(w2 >> (3 * (j - 22) + 2)) & 7 for j in range(22, 32)]    # values 22..31
            out += vals
    else:
        per_word = 32 // bits
        for w in words:
            out += [(w >> (bits * j)) & (2**bits - 1) for j in range(per_word)]
    return out


def random_codes(shape, bits, seed):
    return torch.randint(0, 2**bits, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("rows", [1, 2, 3])
def test_pack_int_matches_the_spec(bits, rows):
    chunk = 32 if bits == 3 else 32 // bits
    values = random_codes((chunk * rows, 5), bits, seed=bits * 10 + rows)
    packed = pack_int(values, bits, dim=0)
    assert packed.dtype == torch.int32 and packed.shape == (chunk * rows * bits // 32, 5)
    for col in range(5):
        assert spec_unpack_column(packed[:, col].tolist(), bits) == values[:, col].tolist()
    assert torch.equal(unpack_int(packed, bits, dim=0), values.int())


@pytest.mark.parametrize("bits", BITS)
def test_pack_along_n_for_zeros(bits):
    chunk = 32 if bits == 3 else 32 // bits
    values = random_codes((3, 2 * chunk), bits, seed=bits)
    packed = pack_int(values, bits, dim=1)
    assert packed.shape == (3, 2 * chunk * bits // 32)
    for row in range(3):
        assert spec_unpack_column(packed[row].tolist(), bits) == values[row].tolist()
    assert torch.equal(unpack_int(packed, bits, dim=1), values.int())


def test_symmetric_4bit_zero_words():
    zeros = torch.full((2, 16), 8)
    q = random_codes((128, 16), 4, seed=1)
    scales, g_idx = torch.rand(2, 16), torch.arange(128) // 64
    v1 = pack_gptq(q, zeros, scales, g_idx, 4, "gptq")
    v2 = pack_gptq(q, zeros, scales, g_idx, 4, "gptq_v2")
    assert {w & 0xFFFFFFFF for w in v1["qzeros"].flatten().tolist()} == {0x77777777}
    assert {w & 0xFFFFFFFF for w in v2["qzeros"].flatten().tolist()} == {0x88888888}
    assert detect_zero_convention(v1["qzeros"], 4) == "gptq"
    assert detect_zero_convention(v2["qzeros"], 4) == "gptq_v2"
    asym = pack_gptq(q, random_codes((2, 16), 4, seed=2).clamp(min=1), scales, g_idx, 4, "gptq")
    assert detect_zero_convention(asym["qzeros"], 4) is None


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
def test_pack_unpack_round_trip_with_short_last_group_and_act_order(bits, checkpoint_format):
    k, n, group_size = 96 if bits != 3 else 96, 64, 40  # 96 = 2 groups of 40 + a short one of 16
    groups = -(-k // group_size)
    q = random_codes((k, n), bits, seed=3)
    low = 1 if checkpoint_format == "gptq" else 0
    zeros = torch.randint(low, 2**bits, (groups, n), generator=torch.Generator().manual_seed(4))
    scales = torch.rand(groups, n, generator=torch.Generator().manual_seed(5)).half()
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(6))
    g_idx = (torch.argsort(perm) // group_size).int()  # act-order: not monotone
    packed = F.pack_gptq(q, zeros, scales, g_idx, bits, checkpoint_format)
    assert packed["qweight"].shape == (k * bits // 32, n) and packed["qzeros"].shape == (groups, n * bits // 32)
    back = F.unpack_gptq(**packed, bits=bits, checkpoint_format=checkpoint_format)
    assert torch.equal(back["q"], q.int()) and torch.equal(back["zeros"], zeros.int())
    assert torch.equal(back["scales"], scales) and torch.equal(back["g_idx"], g_idx)
    # dequantization follows the formula W[n, k] = s[g[k], n] * (q[k, n] - z[g[k], n])
    w = F.dequantize_gptq(**packed, bits=bits, checkpoint_format=checkpoint_format, dtype=torch.float64)
    g = g_idx.long()
    expected = (scales.double()[g] * (q - zeros[g]).double()).t()
    torch.testing.assert_close(w, expected, rtol=0, atol=0)


def test_v1_cannot_store_a_zero_of_zero():
    q = random_codes((32, 32), 4, seed=7)
    zeros = torch.ones(1, 32, dtype=torch.int64)
    zeros[0, 3] = 0
    with pytest.raises(ValueError, match="zero point of 0 cannot be stored in the v1"):
        pack_gptq(q, zeros, torch.rand(1, 32), torch.zeros(32, dtype=torch.int32), 4, "gptq")
    # How every v1 reader reads a stored 15 (a writer's -1): 16, as they compute it.
    raw = pack_int(torch.full((1, 32), 15), 4, dim=1)
    assert bool((unpack_gptq(pack_int(q, 4), raw, torch.rand(1, 32).half(), torch.zeros(32, dtype=torch.int32), 4, "gptq")["zeros"] == 16).all())


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [32, 64, -1])
def test_round_to_nearest(bits, sym, group_size):
    w = torch.randn(48, 160, generator=torch.Generator().manual_seed(8))
    t = quantize_rtn(w, bits, group_size, sym)
    q, z, s, g = t["q"], t["zeros"], t["scales"], t["g_idx"]
    assert q.shape == (160, 48) and int(q.min()) >= 0 and int(q.max()) < 2**bits
    if sym:
        assert bool((z == 2 ** (bits - 1)).all())
    deq = (s.float()[g.long()] * (q - z[g.long()]).float()).t()
    step = s.float()[g.long()].t()
    lowest = (-z.float()[g.long()] * s.float()[g.long()]).t()
    highest = ((2**bits - 1 - z.float()[g.long()]) * s.float()[g.long()]).t()
    inside = (w >= lowest) & (w <= highest)
    err = (deq - w).abs()
    # inside the grid: rounding, at most half a step
    assert bool((err[inside] <= step[inside] * (0.5 + 1e-5)).all())
    # outside it (the grid's ends): half a step, plus the float16 rounding of the scale (2**-11
    # relative) accumulated over up to 2**bits - 1 steps from the zero
    slack = 0.5 + (2**bits - 1) * 2.0**-11
    assert bool((err[~inside] <= step[~inside] * slack).all())


def test_bad_input():
    with pytest.raises(ValueError, match="bits must be one of"):
        pack_int(torch.zeros(32, 1, dtype=torch.int64), 5)
    with pytest.raises(ValueError, match="multiple of 32, got 16"):
        pack_int(torch.zeros(16, 1, dtype=torch.int64), 3)
    with pytest.raises(ValueError, match=r"lie in \[0, 15\]"):
        pack_int(torch.full((8, 1), 16), 4)
    with pytest.raises(TypeError, match="integer tensor"):
        pack_int(torch.zeros(8, 1), 4)
    with pytest.raises(TypeError, match="must be int32"):
        unpack_int(torch.zeros(1, 1, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="checkpoint_format"):
        unpack_gptq(torch.zeros(4, 8, dtype=torch.int32), torch.zeros(1, 4, dtype=torch.int32), torch.zeros(1, 8),
                    torch.zeros(32, dtype=torch.int32), 4, "marlin")


@pytest.mark.parametrize("n, k, bits, group_size, sym, checkpoint_format", [
    (1000, 776, 4, 64, False, "gptq"), (96, 4128, 3, 128, False, "gptq_v2"), (528, 3008, 2, -1, True, "gptq"),
    (4100, 300, 8, 32, False, "gptq_v2"), (33 * 32 + 8, 1024, 4, 128, True, "gptq")])
def test_pack_rtn_in_slices_equals_the_whole_weight_at_once(monkeypatch, n, k, bits, group_size, sym,
                                                            checkpoint_format):
    """pack_rtn quantizes a slice of rows at a time (bounded temporaries): the same tensors as
    quantize_rtn + pack_gptq of the whole weight, with slices that end mid-way through N."""
    from lightllm.quantization.gptq import format as gptq_format

    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)) * 0.02
    zero_min = 1 if checkpoint_format == "gptq" and not sym else 0
    rtn = gptq_format.quantize_rtn(w, bits, group_size, sym=sym, zero_min=zero_min)
    whole = gptq_format.pack_gptq(rtn["q"], rtn["zeros"], rtn["scales"], rtn["g_idx"], bits, checkpoint_format)
    monkeypatch.setattr(gptq_format, "RTN_SLICE_VALUES", 1 << 14)  # several slices at these sizes
    sliced = gptq_format.pack_rtn(w, bits, group_size, sym=sym, zero_min=zero_min,
                                  checkpoint_format=checkpoint_format)
    assert sliced.keys() == whole.keys()
    for key in whole:
        assert sliced[key].dtype == whole[key].dtype and torch.equal(sliced[key], whole[key]), key
