"""The embedded synthetic corpus: documents from several latent Markov sources, with a known entropy rate.

Token 0 separates documents; tokens 1..V-1 are content. Each of ``n_sources`` sources is an
order-``order`` Markov chain over the A = V-1 content tokens whose every context allows only a
few next tokens (random support, Dirichlet weights), so sources are easy to tell apart and each
rewards memorising its own transition table: capacity and routing both pay off.

A document is: the separator, then ``order`` tokens drawn from its source's stationary context
distribution (so every source runs stationary), then Markov steps up to ``doc_length`` tokens.
Documents pick their source uniformly. Per document of length L,

    H(doc) = log2(n) − H(source | doc) + mean_s [ H(π_s) + (L − 1 − order) · h_s ]

where π_s is the stationary context distribution of source s and h_s = Σ_c π_s(c) H(next | c).
The entropy rate (bits per token) is H(doc) / L. ``H(source | doc)`` lies in [0, log2 n]; it is
practically 0 because sources have disjoint-looking supports, and we report the value with it
set to 0, which is an upper bound at most log2(n) / L bits above the exact rate (0.004 bits for
the defaults).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sffn_lab.config import SyntheticConfig

SEPARATOR = 0
SUPPORT = 4  # next tokens allowed per context


@dataclass
class MarkovSources:
    """transitions [n_sources, A**order, A] (rows sum to 1), stationary [n_sources, A**order]."""

    transitions: np.ndarray
    stationary: np.ndarray
    order: int

    @property
    def alphabet(self) -> int:
        return self.transitions.shape[-1]

    def conditional_entropy_bits(self) -> np.ndarray:
        """h_s = Σ_c π_s(c) H(next | c) for each source → [n_sources]."""
        p = self.transitions
        h_context = -(p * np.log2(np.where(p > 0, p, 1))).sum(-1)
        return (self.stationary * h_context).sum(-1)

    def stationary_entropy_bits(self) -> np.ndarray:
        pi = self.stationary
        return -(pi * np.log2(np.where(pi > 0, pi, 1))).sum(-1)


def make_sources(cfg: SyntheticConfig) -> MarkovSources:
    if cfg.vocab_size < 3 or cfg.order < 1 or cfg.n_sources < 1:
        from sffn_lab.errors import UserError

        raise UserError("data.synthetic needs vocab_size ≥ 3, order ≥ 1 and n_sources ≥ 1.")
    rng = np.random.default_rng([cfg.seed, 0])
    a = cfg.vocab_size - 1
    n_ctx = a**cfg.order
    support = min(SUPPORT, a)
    transitions = np.zeros((cfg.n_sources, n_ctx, a))
    for s in range(cfg.n_sources):
        allowed = np.argsort(rng.random((n_ctx, a)), axis=1)[:, :support]
        weights = rng.dirichlet(np.ones(support), size=n_ctx)
        np.put_along_axis(transitions[s], allowed, weights, axis=1)
    return MarkovSources(transitions, _stationary(transitions, cfg.order), cfg.order)


def _stationary(transitions: np.ndarray, order: int, iters: int = 3000) -> np.ndarray:
    """Stationary context distributions by power iteration of the lazy chain (converges for any chain)."""
    n_sources, n_ctx, a = transitions.shape
    # context c = (x_{t-order+1} … x_t) in base a; appending token y gives (c * a + y) mod a**order
    successor = (np.arange(n_ctx)[:, None] * a + np.arange(a)[None, :]) % n_ctx
    pi = np.full((n_sources, n_ctx), 1.0 / n_ctx)
    for _ in range(iters):
        flow = np.zeros_like(pi)
        for s in range(n_sources):
            np.add.at(flow[s], successor, pi[s][:, None] * transitions[s])
        new = 0.5 * pi + 0.5 * flow
        if np.abs(new - pi).max() < 1e-13:
            return new
        pi = new
    return pi


def entropy_rate_bits(cfg: SyntheticConfig, sources: MarkovSources) -> float:
    """Bits per token of the document process (an upper bound within log2(n_sources)/doc_length)."""
    length = cfg.doc_length
    markov_steps = max(0, length - 1 - cfg.order)
    per_source = sources.stationary_entropy_bits() + markov_steps * sources.conditional_entropy_bits()
    return float((np.log2(cfg.n_sources) + per_source.mean()) / length)


def generate_tokens(cfg: SyntheticConfig, sources: MarkovSources, n_tokens: int, stream: int) -> np.ndarray:
    """``n_tokens`` tokens (uint8/int32) of consecutive documents; ``stream`` separates the splits."""
    if cfg.doc_length <= cfg.order + 1:
        from sffn_lab.errors import UserError

        raise UserError("data.synthetic.doc_length must exceed data.synthetic.order + 1.")
    rng = np.random.default_rng([cfg.seed, 1, stream])
    a, n_ctx, length = sources.alphabet, sources.stationary.shape[1], cfg.doc_length
    n_docs = -(-n_tokens // length)
    source = rng.integers(0, cfg.n_sources, n_docs)
    docs = np.empty((n_docs, length), dtype=np.int64)
    docs[:, 0] = SEPARATOR
    cdf_pi = np.cumsum(sources.stationary, axis=1)
    context = _sample_rows(cdf_pi[source], rng)
    for i in range(cfg.order):  # spell the initial context out as tokens, oldest first
        docs[:, 1 + i] = 1 + (context // a ** (cfg.order - 1 - i)) % a
    cdf = np.cumsum(sources.transitions, axis=2)
    for t in range(1 + cfg.order, length):
        nxt = _sample_rows(cdf[source, context], rng)
        docs[:, t] = 1 + nxt
        context = (context * a + nxt) % n_ctx
    dtype = np.uint8 if cfg.vocab_size <= 256 else np.int32
    return docs.reshape(-1)[:n_tokens].astype(dtype)


def _sample_rows(cdf: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One index per row of a batch of CDFs [N, K] → [N]."""
    u = rng.random((cdf.shape[0], 1)) * cdf[:, -1:]
    return np.minimum((cdf < u).sum(axis=1), cdf.shape[1] - 1)
