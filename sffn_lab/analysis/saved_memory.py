"""Activation memory of a forward pass: the bytes of the tensors autograd saves for backward."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

METHOD = (
    "activation memory = bytes of the distinct storages autograd saves for backward during one forward "
    "(torch.autograd.graph.saved_tensors_hooks, deduplicated by storage, parameters excluded, the layer "
    "input included)"
)


def saved_tensor_bytes(forward: Callable[[], object], parameters: Iterable[torch.Tensor]) -> int:
    """Run ``forward()``; the bytes of the storages it saved for backward, ``parameters`` not counted."""
    excluded = {p.untyped_storage().data_ptr() for p in parameters}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        # a new tensor object: packing the output of an op itself would make a cycle through its grad_fn
        # that Python's collector cannot see, and leak the whole graph with its model
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = forward()
    del result
    return sum(storages.values())
