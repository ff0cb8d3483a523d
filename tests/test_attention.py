"""pgolf_kernels.attention: which path a call takes, and cuDNN forward + FlashAttention 4 backward against SDPA.

CPU: the path choice (never the pair off an sm_90 GPU, a clear error when PGOLF_ATTN_BWD=fa4 cannot be met, an
unknown setting rejected) and the SDPA fallback's values. GPU (@pytest.mark.gpu, skipped where FlashAttention 4 is
not installed or the GPU is not sm_90): output and q/k/v gradients of the pair against SDPA's cuDNN forward and
backward on random bf16 inputs, relative error (Frobenius) <= 2e-2 each, about four times bf16 rounding of the
outputs (the two backwards sum in different orders), and every value finite.
"""
import pytest
import torch
import torch.nn.functional as F

from pgolf_kernels import attention as attn


def _qkv(b, h, kvh, t, d, device, dtype, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    # [B, heads, T, D] views of [B, T, heads, D] memory, as the fused block passes them
    mk = lambda heads: torch.randn(b, t, heads, d, device=device, generator=g, dtype=dtype).transpose(1, 2)
    return mk(h), mk(kvh), mk(kvh)


def test_cpu_falls_back_to_sdpa_with_same_values(monkeypatch):
    monkeypatch.setattr(attn, "ATTN_BWD", "auto")
    q, k, v = (x.requires_grad_() for x in _qkv(2, 4, 2, 16, 8, "cpu", torch.float32))
    assert attn.attention_path(q, k, train=True) == "sdpa"
    y = attn.attention(q, k, v, train=True)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(y, ref)


def test_fa4_setting_off_gpu_raises_with_reason(monkeypatch):
    monkeypatch.setattr(attn, "ATTN_BWD", "fa4")
    q, k, v = _qkv(1, 4, 4, 16, 8, "cpu", torch.float32)
    with pytest.raises(RuntimeError, match="PGOLF_ATTN_BWD=fa4.*not an sm_90 GPU"):
        attn.attention(q, k, v, train=True)
    attn.attention(q, k, v, train=False)  # evaluation has no backward: SDPA, no error


def test_gqa_and_eval_never_take_the_pair(monkeypatch):
    monkeypatch.setattr(attn, "ATTN_BWD", "auto")
    q, k, _ = _qkv(1, 8, 4, 16, 8, "cpu", torch.float32)
    assert "GQA" in attn._pair_usable(q, k, train=True)
    assert attn._pair_usable(q, q, train=False) == "not training"


def test_sdpa_setting_and_backends_without_cudnn_say_why(monkeypatch):
    from torch.nn.attention import SDPBackend
    q, k, _ = _qkv(1, 4, 4, 16, 8, "cpu", torch.float32)
    monkeypatch.setattr(attn, "ATTN_BWD", "sdpa")
    assert attn._why_not_pair(q, k, True, None) == "PGOLF_ATTN_BWD=sdpa"
    monkeypatch.setattr(attn, "ATTN_BWD", "auto")
    assert "has no cuDNN" in attn._why_not_pair(q, k, True, [SDPBackend.FLASH_ATTENTION])
    assert attn.attention_path(q, k, True, [SDPBackend.FLASH_ATTENTION]) == "sdpa"


def test_unknown_setting_is_rejected(monkeypatch):
    monkeypatch.setattr(attn, "ATTN_BWD", "fast")
    q, k, v = _qkv(1, 2, 2, 8, 8, "cpu", torch.float32)
    with pytest.raises(ValueError, match="must be one of"):
        attn.attention(q, k, v, train=True)


def test_attention_path_for_sizes_matches_tensors(monkeypatch):
    monkeypatch.setattr(attn, "ATTN_BWD", "auto")
    assert attn.attention_path_for(8, 8, 64, torch.float32, "cpu") == "sdpa"
    monkeypatch.setattr(attn, "_pair_usable", lambda q, k, train: None if q.shape[1] == k.shape[1] else "GQA")
    assert attn.attention_path_for(8, 8, 64, torch.bfloat16, "cpu") == "cudnn+fa4"
    assert attn.attention_path_for(8, 4, 64, torch.bfloat16, "cpu") == "sdpa"


def test_fa4_status_is_a_reason_or_available():
    s = attn.fa4_status()
    assert s == "available" or "FlashAttention 4" in s


def _needs_pair():
    if attn.fa4_status() != "available":
        pytest.skip(attn.fa4_status())
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("cuDNN forward + FA4 backward runs on sm_90 only")


@pytest.mark.gpu
@pytest.mark.parametrize("b,t,compiled", [(2, 1024, False), (1, 2048, False), (3, 384, False), (2, 1024, True)])
def test_gpu_cudnn_forward_fa4_backward_matches_sdpa(monkeypatch, b, t, compiled):
    _needs_pair()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    monkeypatch.setattr(attn, "ATTN_BWD", "fa4")
    h, d = 8, 64
    q, k, v = _qkv(b, h, h, t, d, "cuda", torch.bfloat16, seed=b * t)
    dy = torch.randn(b, t, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    fn = lambda *a: attn.attention(*a, train=True)
    if compiled:  # the pair inside a compiled graph: the FA4 backward as the custom op
        fn = torch.compile(fn, fullgraph=True)

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        assert attn.attention_path(*leaves[:2], train=True) == "cudnn+fa4"
        y = fn(*leaves)
        got = [y] + list(torch.autograd.grad(y, leaves, dy))
        if compiled:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                torch.autograd.grad(fn(*leaves), leaves, dy)
                torch.cuda.synchronize()
            names = [e.name for e in prof.events()]
            assert any("FlashAttentionBackwardSm90" in n for n in names), "compiled backward did not run FA4's"
        ref_leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        y_ref = F.scaled_dot_product_attention(*ref_leaves, is_causal=True)
        want = [y_ref] + list(torch.autograd.grad(y_ref, ref_leaves, dy))
    for name, a, r in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.isfinite(a).all(), f"{name} has non-finite values"
        assert a.shape == r.shape, name
        err = ((a.float() - r.float()).norm() / r.float().norm()).item()
        assert err <= 2e-2, f"{name}: relative error {err:.3e} > 2e-2"
