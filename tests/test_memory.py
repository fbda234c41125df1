"""Transformer-XL: relative attention depends on offsets only, a model with memory evaluated segment by segment
equals the same model over the concatenated context (float64), and every evaluation mode scores every token once."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sffn_lab import training
from sffn_lab.config import load_config
from sffn_lab.data.datamodule import IGNORE_INDEX, EvalStreams, EvalWindows, TrainStreams
from sffn_lab.models import build_model
from sffn_lab.models.transformer import CausalSelfAttention, relative_sinusoids
from tests.histories import csv_history
from tests.support import TINY, as_flags, interrupt_training_at, run_cli

S = 8


def xl_model(positions: str, segments: int, max_seq_len: int = S, kind: str = "dense"):
    cfg = load_config(None, ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.ffn.d_ff=64",
                             f"model.positions={positions}", f"model.memory_segments={segments}",
                             f"model.ffn.kind={kind}", "model.ffn.expert_size=16", "model.ffn.top_k=2"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 50, max_seq_len).double().eval()
    for block in model.blocks:  # non-zero biases u, v, so that both terms of the score are exercised
        if block.attn.relative:
            torch.nn.init.normal_(block.attn.content_bias, std=0.5)
            torch.nn.init.normal_(block.attn.position_bias, std=0.5)
    return model


def test_relative_scores_by_hand_in_float64():
    """(q_i + v)·W_r R[i − j] for query i at position M + i, computed directly pair by pair."""
    torch.manual_seed(1)
    attn = CausalSelfAttention(16, 2, 8, 0.0, relative=True).double()
    torch.nn.init.normal_(attn.position_bias)
    B, M = 2, 5
    L = M + S
    q = torch.randn(B, 2, S, 8, dtype=torch.float64)
    got = attn.relative_scores(q, relative_sinusoids(L, 16))
    sinusoids = relative_sinusoids(L, 16).double()
    for i in range(S):
        for j in range(L):
            offset = M + i - j
            if offset < 0:
                assert torch.isinf(got[..., i, j]).all() and (got[..., i, j] < 0).all()
                continue
            r = (attn.pos_proj.weight @ sinusoids[offset]).view(2, 8)
            want = ((q[:, :, i] + attn.position_bias) * r).sum(-1)
            torch.testing.assert_close(got[..., i, j], want, rtol=1e-12, atol=1e-12)


def test_relative_attention_depends_on_offsets_only():
    """Shifting every query and key by the same amount changes no score; moving the keys alone does."""
    torch.manual_seed(2)
    attn = CausalSelfAttention(16, 2, 8, 0.0, relative=True).double()
    q = torch.randn(1, 2, S, 8, dtype=torch.float64)
    short = attn.relative_scores(q, relative_sinusoids(S, 16))  # queries at 0 … S − 1
    long = attn.relative_scores(q, relative_sinusoids(S + 3, 16))  # queries at 3 … S + 2, keys 0 … S + 2
    torch.testing.assert_close(long[..., 3:], short, rtol=0, atol=0)  # the same offsets: the same scores
    assert not torch.allclose(long[..., 2:-1], short)  # each key one position further away: other scores


@pytest.mark.parametrize("positions", ["relative", "rope"])
def test_memory_segment_by_segment_equals_the_concatenated_context(positions):
    """With N memory segments, segments 0 … N see their whole past through the cache: their logits equal one
    pass over the concatenated tokens (float64). Segment N + 1 has lost the oldest segment: it differs."""
    N, n_segments = 2, 4
    with_memory = xl_model(positions, N)
    full = xl_model(positions, 0, max_seq_len=n_segments * S)
    full.load_state_dict(with_memory.state_dict())
    tokens = torch.randint(0, 50, (3, n_segments * S), generator=torch.Generator().manual_seed(3))
    reference = full(tokens).logits
    memory = None
    for k in range(n_segments):
        out = with_memory(tokens[:, k * S:(k + 1) * S], memory)
        memory = out.memory
        assert [m.shape for m in memory] == [(3, min(N, k + 1) * S, 32)] * 2
        if k <= N:
            torch.testing.assert_close(out.logits, reference[:, k * S:(k + 1) * S], rtol=1e-10, atol=1e-10)
        else:
            assert not torch.allclose(out.logits, reference[:, k * S:(k + 1) * S], atol=1e-6)


@pytest.mark.parametrize("positions", ["relative", "rope"])
def test_decoding_with_memory_sees_what_a_full_context_model_sees(positions):
    """float64: with 3 memory segments of 8 tokens, every next-token distribution over a 28-token text (it
    never leaves the memory's reach) equals that of the same weights reading the whole prefix at once, and
    differs from 8-token windows once the prefix is longer than a window."""
    from sffn_lab.models.sampling import SegmentCache, next_token_logits

    with_memory = xl_model(positions, 3)
    full, windowed = xl_model(positions, 0, max_seq_len=4 * S), xl_model(positions, 0)
    full.load_state_dict(with_memory.state_dict())
    windowed.load_state_dict(with_memory.state_dict())
    text = torch.randint(0, 50, (2, 28), generator=torch.Generator().manual_seed(4))
    cache = SegmentCache()
    with torch.no_grad():
        for n in range(1, 29):
            got = next_token_logits(with_memory, text[:, :n], S, cache)
            torch.testing.assert_close(got, full(text[:, :n]).logits[:, -1].float(), rtol=1e-10, atol=1e-10)
            if n > S:
                assert not torch.allclose(got, next_token_logits(windowed, text[:, :n], S), atol=1e-6)
    assert cache.start == 3 * S  # three segments cached, the fourth being read


def test_memory_carries_no_gradient():
    model = xl_model("relative", 1).train()
    tokens = torch.randint(0, 50, (2, 2 * S))
    first = model(tokens[:, :S])
    second = model(tokens[:, S:], first.memory)
    assert all(not m.requires_grad for m in first.memory)
    second.logits.sum().backward()  # would fail or reach the first segment's graph if the cache kept it


def targets_scored(dataset) -> list[int]:
    """Every target token scored by a dataset over tokens = arange(N) (the target is its own position)."""
    scored = []
    for i in range(len(dataset)):
        _, y = dataset[i]
        scored += [int(t) for t in y.flatten() if t != IGNORE_INDEX]
    return scored


@pytest.mark.parametrize("n", [2, 9, 64, 65, 100, 257])
@pytest.mark.parametrize("stride", [S, 1, 3, 5])
def test_sliding_windows_score_every_token_once_with_enough_context(n, stride):
    tokens = np.arange(n)
    windows = EvalWindows(tokens, S, stride=stride)
    assert sorted(targets_scored(windows)) == list(range(1, n))
    for i in range(len(windows)):
        x, y = windows[i]
        for position in np.flatnonzero(y.numpy() != IGNORE_INDEX):
            assert y[position] == x[position] + 1  # targets follow their inputs
            context = position + 1
            assert context >= S - stride + 1 or int(x[0]) == 0  # the first window alone has shorter contexts


@pytest.mark.parametrize("n", [2, 9, 64, 100, 257])
@pytest.mark.parametrize("streams", [1, 3, 4])
@pytest.mark.parametrize("world", [1, 2])
def test_streams_score_every_token_once_and_run_in_order(n, streams, world):
    tokens = np.arange(n)
    scored = []
    for rank in range(world):
        data = EvalStreams(tokens, S, streams, rank, world)
        previous = None
        for k in range(len(data)):
            x, y = data[k]
            assert x.shape[1] == S
            if previous is not None:  # each row continues where it left off
                live = y[:, 0] != IGNORE_INDEX
                assert torch.equal(x[live, 0], previous[live, -1] + 1)
            previous = x
        scored += targets_scored(data)
    assert sorted(scored) == list(range(1, n))


def test_training_streams_are_contiguous_rows_and_a_function_of_the_step():
    tokens = np.arange(1000)
    data = TrainStreams(tokens, S, batch_size=4, seed=0, start_step=0)
    x0, y0 = data.batch(0)
    x1, _ = data.batch(1)
    assert torch.equal(x1, x0 + S) and torch.equal(y0, x0 + 1)
    assert torch.equal(x0[:, 0], torch.arange(4) * (999 // 4))
    n_segments = (999 // 4) // S
    assert torch.equal(data.batch(n_segments)[0], x0)  # wraps round after the last whole segment
    halves = [TrainStreams(tokens, S, 4, 0, 0, rank, 2).batch(5)[0] for rank in (0, 1)]
    assert torch.equal(torch.cat(halves), data.batch(5)[0])


XL = as_flags([*TINY, "model.positions=relative", "model.memory_segments=1", "data.batch_size=4",
               "train.checkpoint_every=4", "train.val_every=10"])


def test_training_with_memory_resumes_bitwise_with_its_cache(tmp_path, capsys, monkeypatch):
    """Ctrl-C at step 7, resume: the same validation loss and curve as an uninterrupted run, which needs the
    training cache saved in the checkpoint (without it, step 8 would see no memory)."""
    code, _, err = run_cli(["train", *XL, "--max-steps", "16", "--out", tmp_path / "full", "--no-progress"], capsys)
    assert code == 0, err
    full = next((tmp_path / "full").iterdir())
    build = interrupt_training_at(monkeypatch, 7)
    code, _, err = run_cli(["train", *XL, "--max-steps", "16", "--out", tmp_path / "part", "--no-progress"], capsys)
    assert code == 130, err
    part = next((tmp_path / "part").iterdir())
    saved = torch.load(part / "checkpoints" / "last.ckpt", weights_only=True)["sffn"]["memory"]
    assert [tuple(m.shape) for m in saved] == [(4, 32, 32)]  # 1 layer: batch rows × one segment × d_model
    monkeypatch.setattr(training, "build_trainer", build)
    code, _, err = run_cli(["train", "--resume", part, "--no-progress"], capsys)
    assert code == 0, err
    a, b = (json.loads((d / "summary.json").read_text()) for d in (full, part))
    assert a["val_loss"] == b["val_loss"] and a["tokens_seen"] == b["tokens_seen"]
    assert csv_history(part) == csv_history(full)
    assert "memory of 1 segment" in a["protocol"]
