"""The shared per-row quantiser (pgolf_kernels/quant.py) and its dispatching wrappers (quant_cuda.py).

CPU tests pin the reference's semantics (grid, rounding, clip rules, packing bytes); the GPU tests check that
the reference gives the same answers on a CUDA tensor as on the CPU (the exporter may run on either).
The extension's kernels are compared with these references in tests/test_extension.py.
"""
import pytest
import torch

from pgolf_kernels import quant, quant_cuda

gpu = pytest.mark.gpu


def _weights(rows, cols, seed, scale=0.05, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * scale
    w[0, 0] = 0.7  # one outlier so the search has something to clip
    return w.to(dtype)


def test_qmax_and_bad_bits():
    assert [quant.qmax(b) for b in (4, 5, 6, 8)] == [7, 15, 31, 127]
    for bad in (1, 9):
        with pytest.raises(ValueError, match="bits"):
            quant.qmax(bad)


@pytest.mark.parametrize("rule", ["amax", "search", "percentile"])
@pytest.mark.parametrize("bits", [4, 5, 6, 8])
def test_quantize_dequantize_equals_fake_quant(rule, bits):
    w = _weights(24, 96, seed=bits)
    q, s = quant.quantize_rows(w, bits, rule)
    assert q.dtype == torch.int8 and s.dtype == torch.float16 and s.shape == (24,)
    m = quant.qmax(bits)
    assert int(q.abs().max()) <= m
    assert torch.equal(quant.dequantize_rows(q, s), quant.fake_quant(w, bits, rule))
    if rule == "amax":  # the amax clip always uses the top code somewhere in the row (barring fp16 rounding up)
        assert int(q.abs().amax(dim=1).min()) >= m - 1


def test_rounding_is_half_to_even_on_the_fp16_scale():
    bits = 6
    w = _weights(4, 64, seed=3)
    s = quant.scale_from_clip(quant.row_clip(w, bits), bits).float()
    ks = torch.tensor([-30, -3, -2, 0, 1, 2, 5, 29], dtype=torch.float32)
    w[:, 1 : 1 + ks.numel()] = (ks + 0.5)[None, :] * s[:, None]  # exact ties, below the row's amax
    q, _ = quant.quantize_rows(w, bits)
    want = torch.round(ks + 0.5)  # half to even: -29.5 -> -30, 0.5 -> 0, 2.5 -> 2 ...
    assert torch.equal(q[:, 1 : 1 + ks.numel()].float(), want.expand(4, -1))
    assert set(want.tolist()) == {-30.0, -2.0, 0.0, 2.0, 6.0, 30.0}


def test_tiny_rows_get_the_minimum_scale():
    w = torch.full((2, 16), 1e-9)
    w[1] = 0.0
    q, s = quant.quantize_rows(w, 6)
    assert torch.equal(s.float(), torch.full((2,), quant.MIN_SCALE))
    assert int(q.abs().max()) == 0


def test_search_never_worse_than_amax_and_order_invariant():
    bits = 5
    w = _weights(32, 256, seed=11)
    q_a, s_a = quant.quantize_rows(w, bits, "amax")
    q_s, s_s = quant.quantize_rows(w, bits, "search")
    err_a = (quant.dequantize_rows(q_a, s_a) - w).double().pow(2).sum(1)
    err_s = (quant.dequantize_rows(q_s, s_s) - w).double().pow(2).sum(1)
    assert bool((err_s <= err_a).all()) and bool((err_s < err_a).any())
    # The fp64 error sum makes the choice independent of summation order: permuted columns, same scales.
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(0))
    _, s_p = quant.quantize_rows(w[:, perm].contiguous(), bits, "search")
    assert torch.equal(s_p, s_s)


def test_pack_bytes_are_little_endian_lsb_first():
    assert quant.pack_codes(torch.tensor([-31, 31, 0, 1], dtype=torch.int8), 6).tolist() == [128, 255, 129]
    assert quant.pack_codes(torch.tensor([-15, 15, 0], dtype=torch.int8), 5).tolist() == [192, 63]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_pack_unpack_round_trip(bits):
    m = quant.qmax(bits)
    g = torch.Generator().manual_seed(bits)
    for n in (1, 7, 8, 9, 1001):
        q = torch.randint(-m, m + 1, (n,), generator=g, dtype=torch.int8)
        packed = quant.pack_codes(q, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == (n * bits + 7) // 8
        assert torch.equal(quant.unpack_codes(packed, bits, n), q)


def test_pack_rejects_out_of_range_and_bad_lengths():
    with pytest.raises(ValueError, match="out of range"):
        quant.pack_codes(torch.tensor([16], dtype=torch.int8), 5)
    with pytest.raises(ValueError, match="need"):
        quant.unpack_codes(torch.zeros(3, dtype=torch.uint8), 6, 5)


def test_wrappers_fall_back_to_the_reference_on_cpu():
    w = _weights(8, 40, seed=5)
    for rule in ("amax", "search", "percentile"):
        q, s = quant_cuda.quantize_rows(w, 6, rule)
        q_r, s_r = quant.quantize_rows(w, 6, rule)
        assert torch.equal(q, q_r) and torch.equal(s, s_r)
    packed = quant_cuda.pack_codes(q, 6)
    assert torch.equal(packed, quant.pack_codes(q, 6))
    assert torch.equal(quant_cuda.unpack_codes(packed, 6, q.numel()), q.reshape(-1))
    with pytest.raises(ValueError, match="backend"):
        quant_cuda.quantize_rows(w, 6, backend="fast")


def _scale_oracle(clip, bits):
    # fp32 division computed in float64 and rounded once to fp32 is the correctly rounded fp32 quotient
    s32 = (clip.double() / quant.qmax(bits)).float()
    return s32.clamp_min(quant.MIN_SCALE).half()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=gpu)])
@pytest.mark.parametrize("bits", [4, 5, 6, 7, 8])
def test_scale_from_clip_divides_correctly_rounded(device, bits):
    """200k random clips: the scale must not depend on the device (PyTorch's CUDA division by a Python number
    multiplies by a reciprocal, which flipped one int4 scale of a 512x2048 matrix in an H100 test run)."""
    g = torch.Generator().manual_seed(bits)
    clip = torch.rand(200_000, generator=g) * 0.5 + 1e-4
    got = quant.scale_from_clip(clip.to(device), bits).cpu()
    assert torch.equal(got, _scale_oracle(clip, bits))


@gpu
@pytest.mark.parametrize("rule", ["amax", "search"])
def test_reference_agrees_between_cpu_and_cuda(rule):
    for bits in (4, 5, 6, 8):
        w = _weights(512, 2048, seed=bits + 100)
        q_c, s_c = quant.quantize_rows(w, bits, rule)
        q_g, s_g = quant.quantize_rows(w.cuda(), bits, rule)
        assert torch.equal(q_g.cpu(), q_c) and torch.equal(s_g.cpu(), s_c)
