"""Every S-FFN variant against a plain float64 reference (a loop over tokens), and the identities."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from sffn_lab.config import FFNConfig, ModelConfig, load_config, validate_ffn
from sffn_lab.errors import UserError
from sffn_lab.kernels import RoutingPlan
from sffn_lab.layers import routers
from sffn_lab.layers.expert_bank import ExpertBank
from sffn_lab.layers.factory import build_ffn
from sffn_lab.layers.routers import sinkhorn
from sffn_lab.models import build_model
from sffn_lab.variants import kinds
from sffn_lab.variants.avgk import AvgKOptions
from sffn_lab.variants.pkm import PKMOptions
from sffn_lab.variants.sbase import SBaseOptions
from sffn_lab.variants.sigma_moe import SigmaMoEOptions
from sffn_lab.variants.switch import SwitchOptions
from tests.causality import assert_causal

D = 12
ATOL = 1e-10  # float64 throughout: differences are rounding only
VOCAB = 300_000  # more token ids than word-level WikiText-103 has types


def fresh(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype)


def layer(kind: str, **options) -> torch.nn.Module:
    cfg = dataclasses.replace(FFNConfig(kind=kind, d_ff=24, n_experts=6, expert_size=4, top_k=2), **options)
    validate_ffn(ModelConfig(ffn=cfg))
    return build_ffn(cfg, D, n_layers=2, vocab_size=VOCAB).double()


def expert_output(bank: ExpertBank, x_t: torch.Tensor, e: int) -> torch.Tensor:
    """V_eᵀ act(K_eᵀ x_t), written with plain sums."""
    hidden = [torch.relu(sum(x_t[d] * bank.keys[e, d, g] for d in range(D))) for g in range(bank.keys.shape[2])]
    return sum(hidden[g] * bank.values[e, g] for g in range(len(hidden)))


def assert_same_outputs_and_grads(module, x, ids, reference):
    """Compare y and d(y·w)/d(x, every parameter) of ``module`` with ``reference(x) -> y``."""
    w = fresh(*x.shape)
    x1 = x.clone().requires_grad_(True)
    y = module(x1, ids).y
    (y * w).sum().backward()
    got = {"x": x1.grad.clone(), **{n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}}
    module.zero_grad()
    x2 = x.clone().requires_grad_(True)
    y_ref = reference(x2)
    (y_ref * w).sum().backward()
    torch.testing.assert_close(y, y_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(x1.grad, x2.grad, atol=ATOL, rtol=0)
    for name, p in module.named_parameters():
        if name in got:
            torch.testing.assert_close(got[name], p.grad, atol=ATOL, rtol=0, msg=name)


class ReplayRNG(torch.nn.Module):
    """Runs ``inner`` from a fixed CPU RNG state, so that a reference can draw the same dropout masks."""

    def __init__(self, inner: torch.nn.Module, state: torch.Tensor):
        super().__init__()
        self.inner, self.state = inner, state

    def forward(self, x, token_ids=None):
        torch.set_rng_state(self.state)
        return self.inner(x, token_ids)


def test_expert_bank_with_uneven_and_empty_loads():
    bank = ExpertBank(D, n_experts=5, expert_size=3).double()
    T = 9
    x = fresh(T, D)
    indices = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0], [0, 2], [2, 1], [0, 1], [0, 1], [0, 2]])  # 3, 4: empty
    gates = torch.rand(T, 2, dtype=torch.float64, requires_grad=True)

    def reference(x):
        return torch.stack([sum(gates[t, k] * expert_output(bank, x[t], int(indices[t, k])) for k in range(2))
                            for t in range(T)])

    w = fresh(T, D)
    (bank(x, RoutingPlan.of(indices, 5), gates) * w).sum().backward()
    grads = [bank.keys.grad.clone(), bank.values.grad.clone(), gates.grad.clone()]
    bank.zero_grad()
    gates.grad = None
    (reference(x) * w).sum().backward()
    for got, want in zip(grads, [bank.keys.grad, bank.values.grad, gates.grad], strict=True):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert bank.keys.grad[3:].abs().sum() == 0  # empty experts get no gradient


def routed_reference(module, scores_of, gate_of, k):
    """Reference for router+bank layers: per token, top-k of scores_of(x_t), gate_of(scores, chosen)."""

    def reference(x):
        out = []
        for x_t in x.reshape(-1, D):
            scores = scores_of(x_t)
            chosen = sorted(range(len(scores)), key=lambda e: -float(scores[e]))[:k]
            out.append(sum(gate_of(scores, e) * expert_output(module.bank, x_t, e) for e in chosen))
        return torch.stack(out).view(x.shape)

    return reference


@pytest.mark.parametrize("gate", ["sigmoid", "softmax", "softmax_topk", "none"])
@pytest.mark.parametrize("renormalize", [False, True])
def test_sigma_moe(gate, renormalize):
    if gate == "none" and renormalize:
        pytest.skip("nothing to renormalise")

    m = layer("sigma_moe", sigma_moe=SigmaMoEOptions(gate=gate, renormalize=renormalize)).eval()
    sel = m.router.selector

    def gate_of(scores, e):
        top = sorted(range(len(scores)), key=lambda i: -float(scores[i]))[:2]
        raw = {"sigmoid": lambda i: torch.sigmoid(scores[i]), "softmax": lambda i: torch.softmax(scores, 0)[i],
               "softmax_topk": lambda i: scores[i].exp() / sum(scores[j].exp() for j in top),
               "none": lambda i: torch.ones((), dtype=torch.float64)}[gate]
        return raw(e) / sum(raw(i) for i in top) if renormalize else raw(e)

    x = fresh(2, 5, D)
    assert_same_outputs_and_grads(m, x, None, routed_reference(m, lambda x_t: sel @ x_t, gate_of, 2))


def test_switch_top1_softmax_gate():
    m = layer("switch", top_k=1).eval()
    sel = m.router.selector
    reference = routed_reference(m, lambda x_t: sel @ x_t, lambda s, e: torch.softmax(s, 0)[e], 1)
    assert_same_outputs_and_grads(m, fresh(3, 4, D), None, reference)


@pytest.mark.parametrize("kind", ["sbase", "base"])
def test_balanced_routers_are_greedy_top_k_with_sigmoid_gates_at_eval(kind):
    m = layer(kind).eval()
    sel = m.router.selector
    reference = routed_reference(m, lambda x_t: sel @ x_t, lambda s, e: torch.sigmoid(s[e]), 2)
    assert_same_outputs_and_grads(m, fresh(2, 6, D), None, reference)


@pytest.mark.parametrize("gate", ["none", "softmax"])
def test_avgk_scores_blocks_by_their_mean_key(gate):

    m = layer("avgk", avgk=AvgKOptions(gate=gate)).eval()

    def scores_of(x_t):
        G = m.bank.keys.shape[2]
        return torch.stack([sum(x_t @ m.bank.keys[e, :, g] for g in range(G)) / G for e in range(6)])

    gate_of = (lambda s, e: 1.0) if gate == "none" else (lambda s, e: torch.softmax(s, 0)[e])
    assert_same_outputs_and_grads(m, fresh(2, 5, D), None, routed_reference(m, scores_of, gate_of, 2))


def test_hash_routing_is_a_fixed_function_of_the_token_id():
    m = layer("hash")
    ids = torch.randint(0, VOCAB, (3, 7))
    table = {int(t): m.router.table[int(t)].tolist() for t in ids.flatten()}
    assert all(len(set(v)) == 2 for v in table.values())  # K distinct experts

    def reference(x):
        flat = x.reshape(-1, D)
        return torch.stack([sum(expert_output(m.bank, flat[i], e) for e in table[int(t)])
                            for i, t in enumerate(ids.flatten())]).view(x.shape)

    assert_same_outputs_and_grads(m, fresh(3, 7, D), ids, reference)
    again = m.router(fresh(21, D), ids.flatten().flip(0)).indices.flip(0)  # other inputs, other order
    assert torch.equal(again, m.router(fresh(21, D), ids.flatten()).indices)
    with pytest.raises(ValueError, match="token id"):
        m(fresh(1, 2, D), None)


def test_topk_keeps_the_k_largest_activations():
    m = layer("topk", top_k=5)

    def reference(x):
        out = []
        for x_t in x.reshape(-1, D):
            h = torch.relu(m.up.weight @ x_t + m.up.bias)
            kept = sorted(range(len(h)), key=lambda j: -float(h[j]))[:5]
            out.append(sum(h[j] * m.down.weight[:, j] for j in kept) + m.down.bias)
        return torch.stack(out).view(x.shape)

    assert_same_outputs_and_grads(m, fresh(2, 4, D), None, reference)


def test_topk_dropout_acts_before_the_k_cells_are_chosen():
    m = layer("topk", top_k=5, dropout=0.5).train()
    state = torch.get_rng_state()

    def reference(x):
        torch.set_rng_state(state)  # the layer's dropout mask, drawn again
        h = torch.nn.functional.dropout(torch.relu(x.reshape(-1, D) @ m.up.weight.t() + m.up.bias), 0.5)
        out = []
        for h_t in h:
            kept = sorted(range(len(h_t)), key=lambda j: -float(h_t[j]))[:5]
            out.append(sum(h_t[j] * m.down.weight[:, j] for j in kept) + m.down.bias)
        return torch.stack(out).view(x.shape)

    assert_same_outputs_and_grads(ReplayRNG(m, state), fresh(2, 4, D), None, reference)


@pytest.mark.parametrize("activation, query, normalize", [
    ("softmax", "projection", "head"), ("relu", "projection", "head"),
    ("softmax", "input", "joint"), ("relu", "input", "head"),  # the σ-MoE paper's PKM and its ReLU variant
])
def test_pkm_against_exhaustive_product_keys(activation, query, normalize):

    opts = PKMOptions(heads=2, n_keys=5, knn=3, key_dim=6, activation=activation, query=query, normalize=normalize)
    m = layer("pkm", pkm=opts)
    dk = 6 if query == "projection" else D

    def reference(x):
        out = []
        for x_t in x.reshape(-1, D):
            q = (m.query.weight @ x_t).view(2, 2, dk // 2) if query == "projection" else x_t.view(1, 2, dk // 2)
            heads = []
            for h in range(2):
                q_h = q[h] if query == "projection" else q[0]
                half = [m.sub_keys[h, c] @ q_h[c] for c in range(2)]
                best = [sorted(range(5), key=lambda i: -float(half[c][i]))[:3] for c in range(2)]
                pairs = sorted(((half[0][i] + half[1][j], i * 5 + j) for i in best[0] for j in best[1]),
                               key=lambda p: -float(p[0]))[:3]
                heads.append(pairs)
            scores = torch.stack([torch.stack([p[0] for p in pairs]) for pairs in heads])  # [H, knn]
            if activation == "relu":
                w = torch.relu(scores)
            elif normalize == "joint":
                w = torch.softmax(scores.flatten(), 0).view(2, 3)
            else:
                w = torch.softmax(scores, 1)
            out.append(sum(w[h, i] * m.values[slot] for h in range(2) for i, (_, slot) in enumerate(heads[h])))
        return torch.stack(out).view(x.shape)

    assert_same_outputs_and_grads(m, fresh(2, 3, D), None, reference)


# ---------------------------------------------------------------------------------------- identities


def dense_from(keys: torch.Tensor, values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The dense FFN whose d_ff cells are all the experts' cells: x [..., D] → [..., D]."""
    k_all = keys.permute(1, 0, 2).reshape(D, -1)
    v_all = values.reshape(-1, D)
    return torch.relu(x @ k_all) @ v_all


def test_topk_with_k_equal_d_ff_is_the_dense_ffn():
    m = layer("topk", top_k=24)
    dense = layer("dense")
    dense.load_state_dict(m.state_dict())
    x = fresh(2, 5, D)
    torch.testing.assert_close(m(x).y, dense(x).y, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind, options", [("avgk", {}), ("sigma_moe", {"gate": "none"})])
def test_all_experts_without_gates_is_the_dense_ffn(kind, options):

    extra = {"sigma_moe": SigmaMoEOptions(**options)} if kind == "sigma_moe" else {}
    m = layer(kind, top_k=6, **extra).eval()
    x = fresh(2, 5, D)
    torch.testing.assert_close(m(x).y, dense_from(m.bank.keys, m.bank.values, x), atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------- training-mode routing


@pytest.mark.parametrize("k", [1, 2, 3])
def test_base_gives_exactly_balanced_loads_in_training(k):
    m = layer("base", n_experts=6, top_k=k).train()
    out = m(fresh(4, 12, D))  # 48 tokens, 6 experts
    assert torch.equal(out.expert_counts, torch.full((6,), 48.0 * k / 6, dtype=out.expert_counts.dtype))
    indices = m.router(fresh(48, D)).indices
    assert all(len(set(row.tolist())) == k for row in indices)  # distinct experts per token


def test_base_starts_each_auction_from_the_previous_steps_prices_and_saves_them(monkeypatch):
    """The router hands the auction the prices of its previous training step; they are saved with the model,
    so a resumed run assigns as the uninterrupted one; a router saved before the prices existed starts cold."""
    starts = []
    real = routers.balanced_assignment

    def recorded(scores, k, start):
        starts.append(None if start is None else start.clone())  # the buffer itself changes after the call
        return real(scores, k, start)

    monkeypatch.setattr(routers, "balanced_assignment", recorded)
    m = layer("base", n_experts=6, top_k=2).train()
    assert m.router.auction_prices.isnan().all()
    m(fresh(4, 12, D))
    after_first = m.router.auction_prices.clone()
    assert starts == [None] and after_first.isfinite().all()
    resumed = layer("base", n_experts=6, top_k=2).train()
    resumed.load_state_dict(m.state_dict())
    x = fresh(48, D)
    assert torch.equal(m.router(x).indices, resumed.router(x).indices)
    assert torch.equal(starts[1], after_first) and torch.equal(starts[2], after_first)
    torch.testing.assert_close(m.router.auction_prices, resumed.router.auction_prices, atol=0, rtol=0)
    saved_before = {name: v for name, v in m.state_dict().items() if not name.endswith("auction_prices")}
    old = layer("base", n_experts=6, top_k=2)
    old.router.auction_prices.zero_()
    old.load_state_dict(saved_before)
    assert old.router.auction_prices.isnan().all()
    m.eval()(x.view(4, 12, D))  # greedy top-K at evaluation: no auction, the prices stay
    assert len(starts) == 3 and torch.equal(m.router.auction_prices, resumed.router.auction_prices)


def test_sinkhorn_balances_the_marginals():

    logits = fresh(40, 5) * 3
    p = sinkhorn(logits, iters=200).exp()
    torch.testing.assert_close(p.sum(1), torch.ones(40, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(p.sum(0), torch.full((5,), 8.0, dtype=torch.float64), atol=1e-6, rtol=0)
    # Every token shares one direction, so greedy top-1 piles them onto one or two experts; Sinkhorn's
    # column step removes that shared per-expert bias.  Over 20,000 seeds the balanced spread stayed
    # within 0.6 of the greedy spread (median far lower), so 0.75 leaves a margin.
    m = layer("sbase", n_experts=5, top_k=1)
    x = fresh(1, 200, D) * 0.1 + fresh(D)
    greedy = m.eval()(x).expert_counts
    balanced = m.train()(x).expert_counts
    assert balanced.max() - balanced.min() < 0.75 * (greedy.max() - greedy.min())


def test_sigma_moe_entropy_regulariser_and_expert_dropout():

    m = layer("sigma_moe", sigma_moe=SigmaMoEOptions(entropy_coef=0.5, expert_dropout=0.5)).train()
    x = fresh(30, D)
    routing = m.router(x)
    p = torch.softmax(x @ m.router.selector.t(), dim=-1).mean(0)
    torch.testing.assert_close(routing.aux_loss, 0.5 * (p * p.log()).sum(), atol=1e-12, rtol=0)
    torch.manual_seed(0)
    dropped = torch.rand(30, 6, dtype=torch.float64) < 0.5
    torch.manual_seed(0)
    chosen = m.router(x).indices
    enough_left = (~dropped).sum(1) >= 2
    assert enough_left.sum() > 10
    assert not dropped.gather(1, chosen)[enough_left].any()  # a dropped expert is selected only when it must


@pytest.mark.parametrize("gate", ["sigmoid", "softmax", "softmax_topk", "none"])
def test_sigma_moe_gives_a_dropped_but_selected_expert_gate_zero(gate):
    """Per token: drop each expert with probability δ, take the top-K of the survivors, then the best of the
    dropped ones when fewer than K survive; a dropped expert's gate is 0."""

    m = layer("sigma_moe", sigma_moe=SigmaMoEOptions(entropy_coef=0.0, expert_dropout=0.6, gate=gate)).train()
    x = fresh(4, 20, D)
    state = torch.get_rng_state()
    dropped = torch.rand(80, 6, dtype=torch.float64) < 0.6
    assert (~dropped).sum(1).lt(2).sum() > 3  # tokens keeping fewer than K = 2 experts (p < 2e-6 to fail)

    def reference(x):
        logits = x.reshape(-1, D) @ m.router.selector.t()
        out = []
        for t, x_t in enumerate(x.reshape(-1, D)):
            row, lost = logits[t], dropped[t]
            order = sorted(range(6), key=lambda e: (bool(lost[e]), -float(row[e])))[:2]
            gates = {"sigmoid": torch.sigmoid(row[order]), "softmax": torch.softmax(row, 0)[order],
                     "softmax_topk": torch.softmax(row[order], 0), "none": torch.ones(2, dtype=row.dtype)}[gate]
            out.append(sum(expert_output(m.bank, x_t, e) * (0.0 if lost[e] else g)
                           for e, g in zip(order, gates, strict=True)))
        return torch.stack(out).view(x.shape)

    assert_same_outputs_and_grads(ReplayRNG(m, state), x, None, reference)


def test_switch_balance_loss_and_capacity():

    m = layer("switch", top_k=1, n_experts=4, switch=SwitchOptions(balance_coef=0.01, capacity_factor=1.0)).train()
    x = fresh(16, D)
    routing = m.router(x)
    probs = torch.softmax(x @ m.router.selector.t(), dim=-1)
    f = torch.bincount(probs.argmax(1), minlength=4).double() / 16
    torch.testing.assert_close(routing.aux_loss, 0.01 * 4 * (f * probs.mean(0)).sum(), atol=1e-12, rtol=0)
    seen = {}
    for t in range(16):  # capacity 16/4 = 4 per expert, earlier tokens first
        e = int(routing.indices[t, 0])
        seen[e] = seen.get(e, 0) + 1
        expected = probs[t, e] if seen[e] <= 4 else 0.0
        assert float(routing.gates[t, 0]) == pytest.approx(float(expected), abs=1e-12)


# ---------------------------------------------------------------------------------------- in the model


@pytest.mark.parametrize("kind", kinds())
def test_every_variant_is_causal_in_the_model(kind):
    cfg = load_config(None, [f"model.ffn.kind={kind}", "model.d_model=16", "model.n_heads=2", "model.n_layers=2",
                             "model.ffn.d_ff=32", "model.ffn.n_experts=4", "model.ffn.expert_size=8",
                             "model.ffn.top_k=2", "model.ffn.pkm.n_keys=6", "model.ffn.pkm.knn=3",
                             "model.ffn.pkm.key_dim=8"])
    model = build_model(cfg.model, vocab_size=30, max_seq_len=20).eval()
    tokens = torch.randint(0, 30, (2, 20))
    for t in (0, int(torch.randint(1, 19, ())), 19):
        assert_causal(model, tokens, t, vocab_size=30)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.ffn.kind=sigma_moe", "model.ffn.n_experts=4", "model.ffn.top_k=5"], "cannot use more experts"),
        (["model.ffn.kind=pkm", "model.ffn.pkm.n_keys=4", "model.ffn.pkm.knn=8"], "knn"),
        (["model.ffn.kind=sigma_moe", "model.ffn.sigma_moe.gate=sigmod"], "Did you mean 'sigmoid'"),
        (["model.ffn.kind=topk", "model.ffn.d_ff=16", "model.ffn.top_k=32"], "top_k"),
        (["model.ffn.kind=swtich"], "Did you mean 'switch'"),
    ],
)
def test_impossible_settings_fail_at_config_time(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(None, overrides)


def test_gradients_reach_the_router_through_the_gates():
    m = layer("sigma_moe")
    out = m(fresh(2, 5, D))
    out.y.sum().backward()
    assert m.router.selector.grad is not None and m.router.selector.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["dense", "sigma_moe"])
def test_paper_init_gives_every_linear_the_same_scaled_std(kind):
    """model.init=paper at 12 layers: std·√fan_in of every linear map (attention, FFN, expert keys and values,
    selector) within 2% of √(2/12), and the selector's rows of equal norm."""
    cfg = load_config(None, [f"model.ffn.kind={kind}", "model.init=paper", "model.n_layers=12", "model.d_model=256",
                             "model.n_heads=4", "model.ffn.d_ff=1024", "model.ffn.n_experts=8",
                             "model.ffn.expert_size=128", "model.ffn.top_k=2"])
    model = build_model(cfg.model, vocab_size=64, max_seq_len=16)
    target = math.sqrt(2 / 12)
    weights = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "head":
            weights[name] = (module.weight, module.in_features)
        elif isinstance(module, ExpertBank):
            E, D, G = module.keys.shape
            weights[f"{name}.keys"], weights[f"{name}.values"] = (module.keys, D), (module.values, E * G)
        elif hasattr(module, "selector"):
            weights[f"{name}.selector"] = (module.selector, module.selector.shape[1])
            norms = module.selector.norm(dim=1)
            assert torch.allclose(norms, norms[0].expand_as(norms), rtol=1e-5)
    assert len(weights) >= 12 * (4 if kind == "dense" else 5)
    for name, (weight, fan_in) in weights.items():
        # 2%, or 6 standard errors of a sample std over n draws (≈ 1/√(2n)) for the small selector: a run
        # makes hundreds of these checks, so 4 SE (p ≈ 6e-5 each) failed by chance; a wrong init rule (a
        # missing √scale, the wrong fan-in) is off by ≥ 40%, far outside either
        tolerance = max(0.02, 6 / math.sqrt(2 * weight.numel()))
        assert abs(float(weight.std()) * math.sqrt(fan_in) / target - 1) < tolerance, name


@pytest.mark.parametrize("kind, options, scale, per_expert, equal_rows", [
    ("sigma_moe", {}, 1.0, False, True),
    ("sigma_moe", {"model.ffn.sigma_moe.init": "standard"}, 1.0, True, True),
    ("switch", {}, 0.1, True, False),
    ("sbase", {}, 1.0, False, True),
])
def test_each_router_initialises_its_bank_as_the_sigma_moe_paper_does(kind, options, scale, per_expert, equal_rows):
    """Under model.init=paper at 12 layers, s = √(2/12)·√scale: keys and selector std·√D = s, values std·√fan_in = s
    with fan-in G (per expert) or N_E·G; σ-MoE and S-BASE selectors have rows of equal norm, Switch's do not."""
    cfg = load_config(None, [f"model.ffn.kind={kind}", "model.init=paper", "model.n_layers=12", "model.d_model=256",
                             "model.n_heads=4", "model.ffn.n_experts=8", "model.ffn.expert_size=128",
                             "model.ffn.top_k=2", *(f"{k}={v}" for k, v in options.items())])
    model = build_model(cfg.model, vocab_size=64, max_seq_len=16)
    target = math.sqrt(2 / 12 * scale)
    for block in model.blocks:
        bank, selector = block.ffn.bank, block.ffn.router.selector
        E, Dm, G = bank.keys.shape
        for weight, fan_in in ((bank.keys, Dm), (bank.values, G if per_expert else E * G), (selector, Dm)):
            tolerance = max(0.02, 6 / math.sqrt(2 * weight.numel()))  # 6 SE, as above
            assert abs(float(weight.std()) * math.sqrt(fan_in) / target - 1) < tolerance
        norms = selector.norm(dim=1)
        assert torch.allclose(norms, norms[0].expand_as(norms), rtol=1e-5) == equal_rows


def test_sbase_expert_dropout_removes_dropped_experts_from_the_balanced_selection():

    m = layer("sbase", n_experts=6, top_k=2, sbase=SBaseOptions(expert_dropout=0.5)).train()
    x = fresh(60, D)
    state = torch.get_rng_state()
    indices = m.router(x).indices
    torch.set_rng_state(state)
    dropped = torch.rand(60, 6, dtype=torch.float64) < 0.5
    balanced = sinkhorn(x @ m.router.selector.t(), 3)
    want = [sorted(sorted(range(6), key=lambda e: (bool(dropped[t, e]), -float(balanced[t, e])))[:2])
            for t in range(60)]
    assert indices.sort(dim=1).values.tolist() == want  # survivors first, then the best dropped ones
    enough_left = (~dropped).sum(1) >= 2
    assert not dropped.gather(1, indices)[enough_left].any()


@pytest.mark.parametrize("activation", ["softmax", "relu"])
def test_pkm_reading_every_slot_sums_the_heads_scores(activation):
    """knn = 0 (the σ-MoE authors' PKM runs): slot (i, j) scores Σ_h (q₁·k₁ᵢ + q₂·k₂ⱼ) with q the input itself,
    the activation runs over all n_keys² slots, and every slot's value is read."""

    m = layer("pkm", pkm=PKMOptions(heads=3, n_keys=4, knn=0, activation=activation, query="input"))

    def reference(x):
        out = []
        for x_t in x.reshape(-1, D):
            q = x_t.view(2, D // 2)
            scores = torch.stack([sum(m.sub_keys[h, 0, i] @ q[0] + m.sub_keys[h, 1, j] @ q[1] for h in range(3))
                                  for i in range(4) for j in range(4)])
            w = torch.softmax(scores, 0) if activation == "softmax" else torch.relu(scores)
            out.append(sum(w[s] * m.values[s] for s in range(16)))
        return torch.stack(out).view(x.shape)

    assert_same_outputs_and_grads(m, fresh(2, 3, D), None, reference)
