"""Per-rank work for the two-process gloo tests (kept light: a spawned rank imports only this and routers)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from sffn_lab.config import FFNConfig
from sffn_lab.variants import variant
from sffn_lab.variants.sbase import SBaseOptions
from sffn_lab.variants.sigma_moe import SigmaMoEOptions
from sffn_lab.variants.switch import SwitchOptions

AUX_ROUTERS = {
    "sigma_moe": FFNConfig(kind="sigma_moe", n_experts=6, top_k=2,
                           sigma_moe=SigmaMoEOptions(entropy_coef=0.3)),
    "switch": FFNConfig(kind="switch", n_experts=6, top_k=1, switch=SwitchOptions(balance_coef=0.3)),
    "sbase": FFNConfig(kind="sbase", n_experts=6, top_k=2, sbase=SBaseOptions(entropy_coef=0.3)),
}


def router_aux_and_grad(kind: str, x: torch.Tensor) -> tuple[float, torch.Tensor]:
    """The router's auxiliary loss on x [T, D] and its gradient on the selector [N_E, D], in float64."""
    torch.manual_seed(0)
    router = variant(kind).router_class()(AUX_ROUTERS[kind], x.shape[1], n_layers=2, vocab_size=64).double().train()
    routing = router(x)
    routing.aux_loss.backward()
    return routing.aux_loss.item(), router.selector.grad


def aux_loss_rank(rank: int, world: int, port: int, x: torch.Tensor, out: Path) -> None:
    """One gloo rank: its slice of the global batch x → aux losses and selector gradients in out/<rank>.pt."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = {kind: router_aux_and_grad(kind, x.chunk(world)[rank]) for kind in AUX_ROUTERS}
        torch.save(results, Path(out) / f"{rank}.pt")
        dist.barrier()  # no rank tears the group down while another still uses it
    finally:
        dist.destroy_process_group()
