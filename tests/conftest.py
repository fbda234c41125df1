"""Test-wide settings."""

import os

import torch

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run in Triton's CPU interpreter, so they are tested everywhere.
    os.environ.setdefault("TRITON_INTERPRET", "1")
