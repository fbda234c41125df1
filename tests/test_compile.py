"""`torch.compile` through the sparse layers: the expert products are custom ops, so a compiled model has
no graph break (BASE's balanced assignment, an auction with data-dependent loops, is the one exception),
and a compiled σ-MoE LM computes what the eager one does."""

from __future__ import annotations

import warnings

import pytest
import torch

from sffn_lab.config import FFN_KINDS, load_config
from sffn_lab.models import build_model

SIZES = ["model.d_model=64", "model.n_layers=2", "model.ffn.d_ff=128", "model.ffn.n_experts=8",
         "model.ffn.expert_size=16", "model.ffn.top_k=2", "model.ffn.pkm.n_keys=8", "model.ffn.pkm.knn=4",
         "model.ffn.pkm.key_dim=16"]
BACKBONES = {
    "smlp_partial": ["model.backbone=smlp", "model.ffn.kind=switch", "model.ffn.top_k=1",
                     "model.smlp.routing=partial_prediction", "model.smlp.n_dense_blocks=1"],
    "transformer_xl": ["model.ffn.kind=sigma_moe", "model.positions=relative", "model.memory_segments=1"],
}


def model_of(overrides: list[str]):
    torch.manual_seed(0)
    return build_model(load_config(None, [*SIZES, *overrides]).model, 50, 32).train()


def graph_breaks(model, *args) -> list[str]:
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        explained = torch._dynamo.explain(model)(*args)
    return [str(b.reason).splitlines()[0] for b in explained.break_reasons]


@pytest.mark.parametrize("kind", [k for k in FFN_KINDS if k != "base"])
def test_every_ffn_kind_compiles_without_a_graph_break(kind):
    assert graph_breaks(model_of([f"model.ffn.kind={kind}"]), torch.randint(0, 50, (2, 32))) == []


@pytest.mark.parametrize("name", BACKBONES)
def test_smlp_and_transformer_xl_compile_without_a_graph_break(name):
    model = model_of(BACKBONES[name])
    tokens = torch.randint(0, 50, (2, 32))
    args = (tokens, model(tokens).memory) if name == "transformer_xl" else (tokens,)
    assert graph_breaks(model, *args) == []


def test_base_breaks_the_graph_only_in_its_assignment():
    """BASE's auction loops on data; everything else of the model still compiles into graphs."""
    assert graph_breaks(model_of(["model.ffn.kind=base"]), torch.randint(0, 50, (2, 32)))


def test_compiled_sigma_moe_lm_matches_eager_loss_and_gradients():
    """Inductor on the CPU, fp32: the loss to 1e-6 relative and every gradient to 1e-5 absolute (the
    compiled graph fuses and reorders float sums around the custom ops, which compute the same products)."""
    model = model_of(["model.ffn.kind=sigma_moe"])
    tokens = torch.randint(0, 50, (4, 32), generator=torch.Generator().manual_seed(1))

    def loss_of(m):
        out = m(tokens)
        return torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), tokens.flatten()) + out.aux_loss

    eager = loss_of(model)
    eager.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch._dynamo.reset()
    compiled = loss_of(torch.compile(model))
    compiled.backward()
    assert float(compiled) == pytest.approx(float(eager), rel=1e-6)
    for p, g in zip(model.parameters(), eager_grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=1e-5)


def test_train_compile_keeps_the_checkpoint_keys():
    """train.compile compiles the model in place: a compiled run's checkpoints load into an eager one."""
    from sffn_lab.lm_module import CorpusInfo, LanguageModelModule

    corpus = CorpusInfo(vocab_size=50, unit="token")
    modules = [LanguageModelModule.create(load_config(None, [*SIZES, f"train.compile={flag}"]), corpus)
               for flag in (False, True)]
    assert modules[1].model._compiled_call_impl is not None and modules[0].model._compiled_call_impl is None
    assert list(modules[0].state_dict()) == list(modules[1].state_dict())
