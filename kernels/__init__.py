"""Sparse expert matmuls behind one interface (installed as ``sffn_lab.kernels``).

``expert_up`` and ``expert_down`` compute the two halves of a block-sparse FFN; they pick the
fastest available path for the device. Until the fast paths land they use the reference.
"""

from sffn_lab.kernels.reference import expert_down_reference as expert_down
from sffn_lab.kernels.reference import expert_up_reference as expert_up

__all__ = ["expert_up", "expert_down"]
