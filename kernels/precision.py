"""The expert products' precision policy: the dtypes the kernels take, autocast followed as a matmul
follows it (whichever device runs them), and fp32 products as ``torch.set_float32_matmul_precision`` says."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the Triton kernels compute in


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


@contextmanager
def fp32_matmul_precision(precision: str) -> Iterator[None]:
    """``torch.set_float32_matmul_precision(precision)`` for the duration of a block ("highest": no TF32)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)
