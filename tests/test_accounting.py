"""Parameter and FLOP accounting against the built modules, and the fair-comparison sizing."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sffn_lab.analysis.accounting import compute_equal, count_ffn, param_equal, variants_table
from sffn_lab.analysis.model_cost import count_model
from sffn_lab.config import FFNConfig, load_config
from sffn_lab.errors import UserError
from sffn_lab.layers.factory import build_ffn
from sffn_lab.models import build_model
from sffn_lab.variants import bank_kinds, kinds
from sffn_lab.variants.base import BaseOptions
from sffn_lab.variants.pkm import PKMOptions

FFN_KINDS, BLOCK_KINDS = kinds(), bank_kinds()

D = 48
BASE = FFNConfig(d_ff=192, n_experts=6, expert_size=32, top_k=2, pkm=PKMOptions(heads=2, n_keys=10, knn=4, key_dim=8))


def numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("kind", FFN_KINDS)
def test_total_params_equal_the_built_modules_numel(kind):
    cfg = dataclasses.replace(BASE, kind=kind)
    assert count_ffn(cfg, D).total_params == numel(build_ffn(cfg, D, n_layers=2, vocab_size=64))


def test_base_fairseq_form_params_equal_the_built_modules_numel():
    cfg = dataclasses.replace(BASE, kind="base", base=BaseOptions(form="fairseq"))
    E, G, K = 6, 32, 2
    assert count_ffn(cfg, D).total_params == numel(build_ffn(cfg, D, n_layers=2, vocab_size=64))
    assert count_ffn(cfg, D).active_params == K * (2 * D * G + G + 3 * D) + E * D  # + LN_e, b1, b2 per expert


def test_active_params_by_hand():
    E, G, K = 6, 32, 2
    sigma = count_ffn(dataclasses.replace(BASE, kind="sigma_moe"), D)
    assert sigma.active_params == K * (D * G + G * D) + E * D  # K blocks of keys+values, and the selector
    assert sigma.flops_per_token == 2 * K * 2 * D * G + 2 * E * D
    hashed = count_ffn(dataclasses.replace(BASE, kind="hash"), D)
    assert hashed.active_params == K * 2 * D * G and hashed.flops_per_token == 4 * K * D * G
    pkm = count_ffn(dataclasses.replace(BASE, kind="pkm"), D)
    assert pkm.active_params == D * 2 * 8 + 2 * 10 * 8 + 2 * 4 * D  # query, sub-keys, read values


def closed_form(cfg: FFNConfig, D: int) -> tuple[int, int, int]:
    """(total, active, FLOPs/token) of a built-in layer, written out by hand: the oracle of the measured costs."""
    E, G, K, d_ff = cfg.n_experts, cfg.expert_size, cfg.top_k, cfg.d_ff
    if cfg.kind == "dense":
        params = 2 * D * d_ff + d_ff + D
        return params, params, 4 * D * d_ff
    if cfg.kind == "topk":  # every key computed, K value columns read
        return 2 * D * d_ff + d_ff + D, D * d_ff + d_ff + K * D + D, 2 * D * d_ff + 2 * K * D
    if cfg.kind == "pkm":
        p = cfg.pkm
        key_dim = D if p.query == "input" else p.key_dim
        query = 0 if p.query == "input" else D * p.heads * key_dim
        sub_keys, values = p.heads * p.n_keys * key_dim, p.n_keys**2 * D
        total = query + sub_keys + values
        if p.knn == 0:
            return total, total, 2 * query + 2 * sub_keys + p.heads * p.n_keys**2 + 2 * values
        return (total, query + sub_keys + p.heads * p.knn * D,
                2 * query + 2 * sub_keys + p.heads * p.knn**2 + 2 * p.heads * p.knn * D)
    selector = cfg.kind in ("sigma_moe", "switch", "sbase", "base")  # a learned W_sel [N_E, D]
    scores = selector or cfg.kind == "avgk"  # N_E scores per token (Avg-K: against the blocks' mean keys)
    block = 2 * G * D + (G + 3 * D if cfg.kind == "base" and cfg.base.form == "fairseq" else 0)
    router = E * D if selector else 0
    return E * block + router, K * block + router, 4 * K * G * D + (2 * E * D if scores else 0)


SHAPES = {
    "default": BASE,
    "knn 0": dataclasses.replace(BASE, pkm=PKMOptions(heads=2, n_keys=6, knn=0, key_dim=8)),
    "query=input": dataclasses.replace(BASE, pkm=PKMOptions(heads=1, n_keys=8, knn=3, query="input")),
    "fairseq form": dataclasses.replace(BASE, base=BaseOptions(form="fairseq")),
    "K = N_E": dataclasses.replace(BASE, top_k=6, d_ff=96),
}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", FFN_KINDS)
def test_costs_measured_from_the_built_layer_equal_the_closed_forms(kind, shape):
    """Counted parameters and FlopCounterMode's FLOPs of one forward, with what each variant declares (its
    inactive parameters, the FLOPs the counter cannot see), equal the hand-written counts."""
    cfg = dataclasses.replace(SHAPES[shape], kind=kind)
    cost = count_ffn(cfg, D)
    assert (cost.total_params, cost.active_params, cost.flops_per_token) == closed_form(cfg, D)


def test_a_plugin_router_with_a_routing_product_of_its_own_is_counted_without_a_formula():
    """A router with a two-layer scoring MLP (D → 2D → N_E): its parameters and both products are counted, and
    compute_equal sizes G for them, with nothing written about its cost."""
    import torch.nn as nn

    from sffn_lab.variants import LinearRouter, Routing, register
    from sffn_lab.variants.registry import VARIANTS

    class MLPRouter(LinearRouter):
        def __init__(self, cfg, d_model, n_layers, vocab_size):
            super().__init__(cfg, d_model, n_layers, vocab_size)
            self.hidden = nn.Linear(d_model, 2 * d_model, bias=False)

        def forward(self, x, token_ids=None, bank=None) -> Routing:
            scores = torch.nn.functional.linear(self.hidden(x)[..., : x.shape[-1]], self.selector)
            gates, indices = scores.softmax(-1).topk(self.k, dim=-1)
            return Routing(indices, gates)

    register("mlp_router_test")(MLPRouter)
    try:
        cfg = dataclasses.replace(BASE, kind="mlp_router_test")
        E, G, K = 6, 32, 2
        cost = count_ffn(cfg, D)
        assert cost.total_params == E * 2 * G * D + E * D + 2 * D * D
        assert cost.active_params == K * 2 * G * D + E * D + 2 * D * D
        assert cost.flops_per_token == 4 * K * G * D + 2 * E * D + 2 * D * 2 * D
        dense = FFNConfig(kind="dense", d_ff=1024)
        sized = compute_equal(dense, "mlp_router_test", 256, n_experts=16, top_k=2)
        target = count_ffn(dense, 256).flops_per_token
        assert abs(count_ffn(sized, 256).flops_per_token - target) <= 4 * 2 * 256  # one cell of G
        assert sized.expert_size == round((target - 2 * 16 * 256 - 2 * 256 * 512) / (4 * 2 * 256))
    finally:
        VARIANTS.pop("mlp_router_test")


@pytest.mark.parametrize("kind", FFN_KINDS)
def test_param_equal_matches_the_dense_total_within_one_percent(kind):
    dense = FFNConfig(kind="dense", d_ff=1024)
    options = {"expert_size": 64, "top_k": 4} if kind in BLOCK_KINDS else {}
    cfg = param_equal(dense, kind, 256, **options)
    ratio = count_ffn(cfg, 256).total_params / count_ffn(dense, 256).total_params
    assert abs(ratio - 1) < 0.01, (kind, ratio)
    assert count_ffn(cfg, 256).total_params == numel(build_ffn(cfg, 256, 2, vocab_size=64))


def test_param_equal_needs_g_to_divide_d_ff():
    with pytest.raises(UserError, match="does not divide"):
        param_equal(FFNConfig(d_ff=1000), "sigma_moe", 64, expert_size=64)


@pytest.mark.parametrize("kind", ["sigma_moe", "switch", "avgk", "pkm"])
def test_compute_equal_matches_dense_flops_to_a_size_step(kind):
    dense = FFNConfig(kind="dense", d_ff=1024)
    options = {"n_experts": 16, "top_k": 2} if kind in BLOCK_KINDS else {}
    cfg = compute_equal(dense, kind, 256, **options)
    got, target = count_ffn(cfg, 256).flops_per_token, count_ffn(dense, 256).flops_per_token
    step = count_ffn(dataclasses.replace(cfg, expert_size=cfg.expert_size + 1), 256).flops_per_token - got
    if kind == "pkm":  # sized in whole heads
        step = count_ffn(dataclasses.replace(cfg, pkm=dataclasses.replace(cfg.pkm, heads=1)), 256).flops_per_token
    assert abs(got - target) <= step


def test_model_cost_counts_every_parameter():
    for kind in ("dense", "sigma_moe", "pkm"):
        cfg = load_config(None, [f"model.ffn.kind={kind}", "model.d_model=32", "model.ffn.d_ff=64",
                                 "model.ffn.n_experts=4", "model.ffn.expert_size=16", "model.ffn.pkm.n_keys=8",
                                 "model.ffn.pkm.knn=4", "model.ffn.pkm.key_dim=8", "model.positions=learned"])
        model = build_model(cfg.model, vocab_size=50, max_seq_len=20)
        assert count_model(cfg.model, 50, 20).total_params == numel(model)
    # heads whose total size differs from d_model (the σ-MoE paper's WikiText-103 small: 10 heads of 41 at 412)
    cfg = load_config(None, ["model.d_model=30", "model.n_heads=4", "model.head_dim=6", "model.ffn.d_ff=64"])
    model = build_model(cfg.model, vocab_size=50, max_seq_len=20)
    assert count_model(cfg.model, 50, 20).total_params == numel(model)
    assert model(torch.randint(0, 50, (2, 20))).logits.shape == (2, 20, 50)
    # Transformer-XL relative attention: W_r and the biases u, v per layer
    cfg = load_config(None, ["model.d_model=32", "model.ffn.d_ff=64", "model.positions=relative",
                             "model.memory_segments=1"])
    model = build_model(cfg.model, vocab_size=50, max_seq_len=20)
    assert count_model(cfg.model, 50, 20).total_params == numel(model)


BACKBONES = {
    "learned": [], "rope": ["model.positions=rope"], "relative": ["model.positions=relative"],
    "narrow_heads": ["model.head_dim=8"], "sigma_moe": ["model.ffn.kind=sigma_moe", "model.ffn.top_k=2"],
    "relative_memory": ["model.positions=relative", "model.memory_segments=1"],
    "rope_memory_2": ["model.positions=rope", "model.memory_segments=2"],
    "smlp": ["model.backbone=smlp", "model.ffn.kind=base", "model.ffn.top_k=1"],
}


@pytest.mark.parametrize("backbone", BACKBONES)
def test_model_flops_equal_the_products_of_a_whole_forward_counted_causally(backbone):
    """count_model's FLOPs per token against FlopCounterMode over one sequence's forward (the math attention, so
    its products are seen; with memory, a segment after the memory has filled). The model multiplies every causal product over the whole S × S square (masked);
    count_model counts a token's causal prefix only, on average (S + 1) / 2 of the S positions: the surplus is
    the upper triangle, per token 2·2·inner·(S − 1)/2 per attention layer and 2·F·(S − 1)/2 per sMLP unit.
    (The partial-prediction sMoE multiplies a prefix square and full tail rows: not this rule, not here.)"""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from sffn_lab.config import attention_head_dim
    from sffn_lab.kernels.backends import forced_backend

    vocab, S = 50, 32
    cfg = load_config(None, ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.ffn.d_ff=128",
                             "model.ffn.n_experts=4", "model.ffn.expert_size=32", "model.smlp.d_hidden=64",
                             f"data.seq_len={S}", *BACKBONES[backbone]]).model
    model = build_model(cfg, vocab, S).eval()
    with torch.no_grad(), forced_backend("torch"), sdpa_kernel(SDPBackend.MATH):
        memory = None
        for _ in range(cfg.memory_segments):
            memory = model(torch.randint(0, vocab, (1, S)), memory).memory
        with FlopCounterMode(display=False) as c:
            model(torch.randint(0, vocab, (1, S)), *([memory] if memory else []))
    if cfg.backbone == "smlp":
        surplus = (cfg.smlp.n_dense_blocks + cfg.smlp.n_sparse_blocks) * cfg.smlp.d_hidden * (S - 1)
    else:
        surplus = cfg.n_layers * 2 * cfg.n_heads * attention_head_dim(cfg) * (S - 1)
    assert count_model(cfg, vocab, S).flops_per_token == c.get_total_flops() / S - surplus


def test_variants_table_lists_every_variant_at_equal_parameters():
    rows = variants_table(512, 2048, expert_size=128, top_k=4)
    assert [r["kind"] for r in rows] == list(FFN_KINDS)
    sigma = next(r for r in rows if r["kind"] == "sigma_moe")
    assert sigma["sizes"] == "N_E=16 G=128 K=4" and abs(sigma["flops_vs_dense"] - 0.25) < 0.01
    assert all(abs(r["params_vs_dense"] - 1) < 0.01 for r in rows)


def test_backbones_table_matches_the_dense_transformer_and_picks_the_closest_hidden_width():
    from sffn_lab.analysis.backbones import backbones_table, smlp_hidden_for
    from sffn_lab.config import ModelConfig, SMLPConfig

    rows = backbones_table(d_model=64, d_ff=256, n_layers=4, seq_len=32, vocab_size=50, expert_size=32)
    assert [r["backbone"] for r in rows] == ["transformer dense", "transformer + switch", "transformer + base",
                                            "gmlp", "smlp deterministic + base", "smlp partial prediction + base"]
    assert all(abs(r["params_vs_dense"] - 1) < 0.01 for r in rows), rows
    cfg = ModelConfig(backbone="smlp", d_model=64, smlp=SMLPConfig(n_dense_blocks=2, n_sparse_blocks=1))
    target = 123_457
    best = smlp_hidden_for(cfg, target, vocab_size=50, seq_len=32)

    def miss(d_hidden):
        sized = dataclasses.replace(cfg, smlp=dataclasses.replace(cfg.smlp, d_hidden=d_hidden))
        return abs(count_model(sized, 50, 32).total_params - target)

    step = cfg.smlp.n_chunks
    assert best % step == 0 and miss(best) <= min(miss(best - step), miss(best + step))


def test_pkm_querying_with_the_input_has_no_query_projection():
    cfg = dataclasses.replace(BASE, kind="pkm", pkm=dataclasses.replace(BASE.pkm, query="input"))
    cost = count_ffn(cfg, D)
    assert cost.total_params == numel(build_ffn(cfg, D, n_layers=2, vocab_size=64)) == 2 * 10 * D + 10**2 * D
    assert cost.active_params == 2 * 10 * D + 2 * 4 * D  # sub-keys of size D, read values
    sized = param_equal(FFNConfig(kind="dense", d_ff=1024), "pkm", 256, pkm=PKMOptions(heads=4, query="input"))
    ratio = count_ffn(sized, 256).total_params / count_ffn(FFNConfig(kind="dense", d_ff=1024), 256).total_params
    assert 0.95 < ratio <= 1  # the largest memory that fits: n_keys steps are ~2/n_keys apart


def test_pkm_reading_every_slot_counts_the_whole_table_as_active():
    cfg = dataclasses.replace(BASE, kind="pkm", pkm=dataclasses.replace(BASE.pkm, query="input", knn=0))
    cost = count_ffn(cfg, D)
    assert cost.active_params == cost.total_params == numel(build_ffn(cfg, D, n_layers=2, vocab_size=64))
    assert cost.flops_per_token == 2 * 2 * 10 * D + 2 * 10**2 + 2 * 10**2 * D  # sub-key scores, pair sums, read


@pytest.mark.parametrize("tie", [True, False])
def test_the_smlp_honours_tie_embeddings_and_its_count_follows(tie):
    """The sMLP tied its output head whatever model.tie_embeddings said, while the count followed the key."""
    cfg = load_config(None, ["model.backbone=smlp", "model.d_model=32", "model.smlp.d_hidden=64",
                             "model.ffn.kind=switch", "model.ffn.n_experts=4", "model.ffn.expert_size=16",
                             "model.ffn.top_k=1", f"model.tie_embeddings={str(tie).lower()}"]).model
    model = build_model(cfg, vocab_size=50, max_seq_len=32)
    assert (model.head.weight is model.embed.weight) == tie
    assert count_model(cfg, 50, 32).total_params == numel(model)


def test_the_expert_custom_ops_count_the_flops_of_the_products_they_compute():
    """FlopCounterMode sees a custom op, not its body: the registered formulas give the compiled path's ops the
    FLOPs the eager PyTorch path's matrix products count (forward), and one product per gradient asked for."""
    from torch.utils.flop_counter import FlopCounterMode

    from sffn_lab.kernels import RoutingPlan, custom_ops, expert_down, expert_up
    from sffn_lab.kernels.backends import get_backend

    T, K, E, D, G = 16, 2, 4, 8, 6
    x = torch.randn(T, D, requires_grad=True)
    keys, values = torch.randn(E, D, G, requires_grad=True), torch.randn(E, G, D, requires_grad=True)
    gates = torch.rand(T, K, requires_grad=True)
    plan = RoutingPlan.of(torch.rand(T, E).topk(K, dim=1).indices, E)
    tensors = plan.tensors(get_backend("torch").reads(x, E))
    with FlopCounterMode(display=False) as ops:
        y = custom_ops.expert_down_op(custom_ops.expert_up_op(x, keys, tensors, "torch", False).relu(), values,
                                      tensors, gates, "torch", False)
    with FlopCounterMode(display=False) as eager:
        expert_down(expert_up(x, keys, plan, "torch").relu(), values, plan, gates, "torch")
    product = 2 * T * K * D * G
    assert ops.get_total_flops() == eager.get_total_flops() == 2 * product
    with FlopCounterMode(display=False) as backward:
        y.sum().backward()
    assert backward.get_total_flops() == 2 * product + 3 * product + 2 * T * K * D  # dx, dW; dh, dW, dgates
