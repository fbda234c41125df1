"""``model.ffn.base.form=fairseq`` against a transcription of fairseq's ``BaseSublayer`` and ``BaseLayer.forward``
(fairseq/modules/base_layer.py), in float64: the same weights give the same output and the same gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sffn_lab.config import FFNConfig, ModelConfig, load_config, validate_ffn
from sffn_lab.errors import UserError
from sffn_lab.experiments import DEFAULT_CONFIG
from sffn_lab.layers.factory import build_ffn
from sffn_lab.variants.base import BaseOptions

D, G, ATOL = 10, 6, 1e-12


class BaseSublayer(nn.Module):
    """fairseq's BaseSublayer: xs + ff2(act(ff1(norm(xs)))), ff2.weight zeroed."""

    def __init__(self, d_model: int, ffn_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.ff1 = nn.Linear(d_model, ffn_dim)
        self.ff2 = nn.Linear(ffn_dim, d_model)
        self.ff2.weight.data.zero_()

    def forward(self, xs):
        return xs + self.ff2(torch.relu(self.ff1(self.norm(xs))))


def inverse_sort(order: torch.Tensor) -> torch.Tensor:
    """fairseq's BaseLayer.inverse_sort: xs == xs[order][inverse_sort(order)]."""
    return torch.empty_like(order).scatter_(0, order, torch.arange(0, order.size(0)))


def greedy_assignment(scores: torch.Tensor, num_workers: int) -> tuple[torch.Tensor, list[int]]:
    """fairseq's BaseLayer.greedy_assignment (k = 1): tokens sorted by expert, and how many go to each."""
    token_to_workers = torch.topk(scores, dim=1, k=1, largest=True).indices.view(-1)
    token_to_workers, sort_ordering = torch.sort(token_to_workers)
    output_splits = torch.zeros((num_workers,), dtype=torch.long)
    workers, counts = torch.unique_consecutive(token_to_workers, return_counts=True)
    output_splits[workers] = counts
    return sort_ordering, output_splits.tolist()


def base_layer_forward(input_features, centroids, experts, assignment=None):
    """fairseq's BaseLayer.forward with its E workers in one process (the All2All hands worker e the tokens
    sorted to it, in order); greedy routing (eval), or the given expert per token [T] (training: fairseq's
    balanced assignment, whose algorithm is tested on its own in test_balanced_assignment.py)."""
    features = input_features.reshape(-1, input_features.size(-1))
    with torch.no_grad():
        token_expert_affinities = features.matmul(centroids.transpose(0, 1))
    if assignment is None:
        sort_by_expert, splits = greedy_assignment(token_expert_affinities, len(experts))
    else:
        sort_by_expert = torch.argsort(assignment, stable=True)
        splits = torch.bincount(assignment, minlength=len(experts)).tolist()
    outputs = []
    for expert_id, routed_features in enumerate(features[sort_by_expert].split(splits)):
        if routed_features.size(0) > 0:
            alpha = torch.sigmoid(routed_features.mv(centroids[expert_id])).unsqueeze(1)
            routed_features = alpha * experts[expert_id](routed_features) + (1 - alpha) * routed_features
        outputs.append(routed_features)
    result = torch.cat(outputs)[inverse_sort(sort_by_expert)]
    return result.view(input_features.size())


def fairseq_layer(n_experts: int) -> nn.Module:
    cfg = FFNConfig(kind="base", n_experts=n_experts, expert_size=G, top_k=1, base=BaseOptions(form="fairseq"))
    validate_ffn(ModelConfig(ffn=cfg))
    return build_ffn(cfg, D, n_layers=2, vocab_size=50).double()


def transcribed_experts(layer: nn.Module) -> nn.ModuleList:
    """fairseq sublayers holding our layer's weights (as copies: gradients compared separately)."""
    bank = layer.bank
    experts = nn.ModuleList(BaseSublayer(D, G) for _ in range(bank.n_experts)).double()
    with torch.no_grad():
        for e, sub in enumerate(experts):
            sub.norm.weight.copy_(bank.norm_weight[e])
            sub.norm.bias.copy_(bank.norm_bias[e])
            sub.ff1.weight.copy_(bank.keys[e].t())
            sub.ff1.bias.copy_(bank.key_bias[e])
            sub.ff2.weight.copy_(bank.values[e].t())
            sub.ff2.bias.copy_(bank.value_bias[e])
    return experts


def test_fairseq_form_initialises_as_fairseq():
    layer = fairseq_layer(4)
    c = layer.router.selector
    eye = torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(c @ c.t(), 0.01 * eye, atol=1e-8, rtol=0)  # gain 0.1 (initialised in fp32)
    assert not layer.bank.values.any() and layer.bank.value_bias.any()  # ff2.weight zero, not its bias
    assert (layer.bank.norm_weight == 1).all() and not layer.bank.norm_bias.any()


@pytest.mark.parametrize("n_experts, training", [(1, False), (4, False), (4, True)])
def test_fairseq_form_equals_fairseq_base_layer(n_experts, training):
    """E = 1 is fairseq's single-worker case as written; E = 4 emulates four workers. The output x + y and the
    gradients of x, the centroids and every expert weight agree in float64."""
    layer = fairseq_layer(n_experts).train(training)
    with torch.no_grad():  # trained-looking weights (fairseq starts ff2.weight at zero, LN at the identity)
        for p in (layer.bank.values, layer.bank.norm_weight, layer.bank.norm_bias, layer.router.selector):
            p.normal_()
    experts = transcribed_experts(layer)
    x0 = torch.randn(2, 12, D, dtype=torch.float64)
    w = torch.randn_like(x0)
    x = x0.clone().requires_grad_(True)
    cold = layer.router.auction_prices.clone()
    out = x + layer(x).y
    (out * w).sum().backward()
    assignment = None
    if training:  # the routing our layer used (the auction's), for fairseq's sort into workers
        layer.router.auction_prices.copy_(cold)  # the same start as the layer's call: the same auction
        assignment = layer.router(x0.reshape(-1, D)).indices[:, 0]
        loads = torch.bincount(assignment, minlength=n_experts)
        assert torch.equal(loads, torch.full((n_experts,), 24 // n_experts))
    x_ref = x0.clone().requires_grad_(True)
    centroids = layer.router.selector.detach().clone().requires_grad_(True)
    want = base_layer_forward(x_ref, centroids, experts, assignment)
    (want * w).sum().backward()
    torch.testing.assert_close(out, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=ATOL, rtol=0)
    torch.testing.assert_close(layer.router.selector.grad, centroids.grad, atol=ATOL, rtol=0)
    bank = layer.bank
    for e, sub in enumerate(experts):
        for ours, theirs in [(bank.norm_weight.grad[e], sub.norm.weight.grad),
                             (bank.norm_bias.grad[e], sub.norm.bias.grad),
                             (bank.keys.grad[e].t(), sub.ff1.weight.grad), (bank.key_bias.grad[e], sub.ff1.bias.grad),
                             (bank.values.grad[e].t(), sub.ff2.weight.grad),
                             (bank.value_bias.grad[e], sub.ff2.bias.grad)]:
            # an expert no token reached: fairseq never runs its sublayer (grad None), the bank's slice is zero
            torch.testing.assert_close(ours, theirs if theirs is not None else torch.zeros_like(ours), atol=ATOL,
                                       rtol=0)


def test_fairseq_form_with_k_experts_sums_their_updates():
    """K > 1 (not in fairseq): y = Σ_k σ(x·c_k)·FFN_k(LN_k x), each term fairseq's single-expert update."""
    cfg = FFNConfig(kind="base", n_experts=4, expert_size=G, top_k=2, base=BaseOptions(form="fairseq"))
    layer = build_ffn(cfg, D, n_layers=2, vocab_size=50).double().eval()
    with torch.no_grad():
        layer.bank.values.normal_()
    experts = transcribed_experts(layer)
    x = torch.randn(7, D, dtype=torch.float64)
    indices = (x @ layer.router.selector.t()).topk(2, dim=1).indices
    want = torch.stack([sum(torch.sigmoid(x[t] @ layer.router.selector[e]) * (experts[e](x[t:t + 1])[0] - x[t])
                            for e in indices[t].tolist()) for t in range(7)])
    torch.testing.assert_close(layer(x[None]).y[0], want, atol=ATOL, rtol=0)


def test_the_form_is_checked():
    with pytest.raises(UserError, match=r"Unknown model\.ffn\.base\.form 'fairsek'\..*fairseq"):
        load_config(DEFAULT_CONFIG, ["model.ffn.kind=base", "model.ffn.base.form=fairsek"])
    with pytest.raises(UserError, match=r"model\.init=default"):
        load_config(DEFAULT_CONFIG, ["model.ffn.kind=base", "model.ffn.base.form=fairseq", "model.init=paper"])
