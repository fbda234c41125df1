"""`torch.compile` through the sparse layers: the expert products are custom ops, so a compiled model has
no graph break (BASE's balanced assignment, an auction with data-dependent loops, is the one exception),
and a compiled σ-MoE LM computes what the eager one does."""

from __future__ import annotations

import warnings

import pytest
import torch

from sffn_lab.config import load_config
from sffn_lab.kernels import RoutingPlan, expert_down, expert_up, triton_available
from sffn_lab.kernels.backends import get_backend
from sffn_lab.kernels.routing_plan import PlanReads
from sffn_lab.models import build_model
from sffn_lab.variants import kinds

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


@pytest.mark.parametrize("kind", [k for k in kinds() if k != "base"])
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


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not triton_available(), reason="no triton"))])
def test_the_custom_ops_of_a_compiled_layer_derive_nothing_from_the_plan_again(backend, monkeypatch):
    """Under torch.compile the four custom ops of a layer (both products, both backward passes) receive the plan
    with what their backend reads of it, derived once per layer call in the graph (``RoutingPlan.tensors``
    caches it, as eager calls share one plan object): inside an op no tile table is built again (each op used
    to rebuild Triton's: 4 ops × 2 heights) and the offsets are never read from the device (each op of the
    PyTorch path used to call ``.tolist()`` on them: a host sync per op on CUDA). The compiled layer computes
    what the eager one does."""
    received, from_tensors, make_tiles = [], RoutingPlan.from_tensors.__func__, RoutingPlan._make_tiles

    def checked(cls, tensors, reads):  # runs inside the ops only: the graph builds plans with RoutingPlan.of
        plan = from_tensors(cls, tensors, reads)
        received.append((set(plan._tiles), plan._host_offsets is not None))  # what the op got, derived

        def refuse_sent_heights(height):  # the weight gradient's own spans may still be cut inside an op
            assert height not in reads.tile_heights, "a custom op derived a tile table it was sent"
            return make_tiles(plan, height)

        plan._make_tiles = refuse_sent_heights
        return plan

    T, K, E, D, G = 48, 2, 4, 16, 8
    leaves = [torch.randn(T, D), torch.randn(E, D, G), torch.randn(E, G, D), torch.rand(T, K)]
    indices = torch.randint(0, E, (T, K))
    reads = get_backend(backend).reads(leaves[0], E)
    monkeypatch.setattr(RoutingPlan, "from_tensors", classmethod(checked))

    def layer(x, w1, w2, gates):
        plan = RoutingPlan.of(indices, E)
        return expert_down(torch.relu(expert_up(x, w1, plan, backend, expert_order=True)), w2, plan, gates, backend,
                           expert_order=True)

    def run(fn):
        tensors = [t.clone().requires_grad_(True) for t in leaves]
        y = fn(*tensors)
        y.square().sum().backward()
        return [y.detach()] + [t.grad for t in tensors]

    torch._dynamo.reset()
    eager = run(layer)
    got = run(torch.compile(layer))
    assert received == [(set(reads.tile_heights), reads.host_offsets)] * 4  # up, down, their backward ops
    for a, b in zip(got, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_plan_derives_what_a_backend_reads_once(monkeypatch):
    """``RoutingPlan.tensors``: the derived tensors are cached on the plan, so the layer's two products (and,
    compiled, its four ops) share one derivation; ``from_tensors`` rebuilds the plan with them in place."""
    made = []
    make_tiles = RoutingPlan._make_tiles
    monkeypatch.setattr(RoutingPlan, "_make_tiles", lambda plan, h: made.append(h) or make_tiles(plan, h))
    plan = RoutingPlan.of(torch.randint(0, 4, (30, 2)), 4)
    reads = PlanReads(tile_heights=(16, 32), host_offsets=True)
    first, second = plan.tensors(reads), plan.tensors(reads)
    assert made == [16, 32] and all(a is b for a, b in zip(first, second, strict=True))
    rebuilt = RoutingPlan.from_tensors(first, reads)
    assert rebuilt.host_offsets() == plan.offsets.tolist() and rebuilt.sorted_rows() is plan.sorted_rows()
    assert all(rebuilt.tiles(h).table is plan.tiles(h).table for h in (16, 32)) and made == [16, 32]


def test_train_compile_keeps_the_checkpoint_keys():
    """train.compile compiles the model in place: a compiled run's checkpoints load into an eager one."""
    from sffn_lab.lm_module import CorpusInfo, LanguageModelModule

    corpus = CorpusInfo(vocab_size=50, unit="token")
    modules = [LanguageModelModule.create(load_config(None, [*SIZES, f"train.compile={flag}"]), corpus)
               for flag in (False, True)]
    assert modules[1].model._compiled_call_impl is not None and modules[0].model._compiled_call_impl is None
    assert list(modules[0].state_dict()) == list(modules[1].state_dict())
