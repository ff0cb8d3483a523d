"""Weights that probe a quantiser's edge cases, shared by the quantiser and QAT-linear tests."""
import torch

from pgolf_kernels import quant


def tricky_weights(rows, cols, bits, seed, dtype=torch.float32, device="cpu"):
    """Random rows whose column 0 holds the amax, with entries exactly on half-way points of the row's grid and
    one ulp either side of them, plus a row of tiny values (scale floor) and a row of zeros."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.04
    sign = torch.where(torch.rand(rows, generator=g) < 0.5, -1.0, 1.0)
    w[:, 0] = sign * (0.25 + 0.3 * torch.rand(rows, generator=g))
    s = quant.scale_from_clip(quant.row_clip(w, bits), bits).float()
    m = quant.qmax(bits)
    n = min(8, (cols - 1) // 3)
    ties = (torch.randint(-m, m - 1, (rows, n), generator=g).float() + 0.5) * s[:, None]
    w[:, 1 : 1 + n] = ties
    w[:, 1 + n : 1 + 2 * n] = torch.nextafter(ties, torch.full_like(ties, float("inf")))
    w[:, 1 + 2 * n : 1 + 3 * n] = torch.nextafter(ties, torch.full_like(ties, float("-inf")))
    if rows > 3:
        w[-2] = torch.randn(cols, generator=g) * 1e-8
        w[-1] = 0.0
    return w.to(dtype).to(device)
