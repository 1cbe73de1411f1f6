import torch
import torch.nn as nn

from src.masks.utils import apply_masks  # noqa: F401  (ijepa also exposes it here)


def trunc_normal_(tensor, mean=0., std=1., a=-2., b=2.):
    """Truncated normal init; `a` and `b` are absolute bounds, as in ijepa (so at std 0.02 nothing is cut)."""
    return nn.init.trunc_normal_(tensor, mean=mean, std=std, a=a, b=b)


def repeat_interleave_batch(x, B, repeat):
    """[N*B, ...] -> [N*repeat*B, ...]: each consecutive chunk of B rows is repeated `repeat` times in place.

    Same result as ijepa's nested torch.cat, as one view + expand + reshape.
    """
    if repeat == 1:
        return x
    N = len(x) // B
    x = x.reshape(N, 1, B, *x.shape[1:]).expand(N, repeat, B, *x.shape[1:])   # (N, repeat, B, ...)
    return x.reshape(N * repeat * B, *x.shape[3:])


def true_first(mask, K):
    """Positions [M, K] of each row of the bool [M, L] `mask`: its True entries in order, then its False ones (a
    stable sort, so the order within each kind is kept)."""
    return torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices[:, :K]
