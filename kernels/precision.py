"""How the expert products follow autocast: as a matmul does, whichever device runs them."""

from __future__ import annotations

import functools

import torch


def autocast_operands(a: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, weight) as a matmul under the current autocast of a's device takes them (cast to its dtype),
    else unchanged. The casts are differentiable, so fp32 parameters receive fp32 gradients."""
    device_type = a.device.type
    if torch.is_autocast_enabled(device_type) and a.is_floating_point():
        dtype = torch.get_autocast_dtype(device_type)
        return a.to(dtype), weight.to(dtype)
    return a, weight


def autocast_off(backward):
    """Decorate an autograd backward(ctx, grad) to run with autocast off on grad's device: its products
    then keep the dtypes the forward chose, even when backward is called inside an autocast region."""

    @functools.wraps(backward)
    def wrapped(ctx, grad, *grads):
        with torch.autocast(grad.device.type, enabled=False):
            return backward(ctx, grad, *grads)

    return wrapped
