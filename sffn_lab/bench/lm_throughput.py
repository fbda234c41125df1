"""Bench section "lm": training tokens/s of a σ-MoE language model against its parameter-equal dense model.

Both models are built from the same experiment config (``load_config`` + ``build_model``); the σ-MoE one
replaces every dense FFN by ``param_equal(..., "sigma_moe")``. A round is a few full optimizer steps
(forward, backward, gradient clipping, AdamW) on random token batches of the config's shape.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from sffn_lab.analysis.accounting import ffn_sizes, param_equal
from sffn_lab.bench.records import Measurement, with_ratios
from sffn_lab.bench.sizes import BenchSizes, LMCase
from sffn_lab.bench.timing import interleaved_medians
from sffn_lab.config import Config, load_config
from sffn_lab.models import build_model
from sffn_lab.models.plain_step import plain_training_step


def training_round(cfg: Config, vocab_size: int, steps: int):
    """A closure running ``steps`` optimizer steps of ``cfg``'s model, and the model's parameter count."""
    model = build_model(cfg.model, vocab_size, cfg.data.seq_len)
    t = cfg.train
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay
    )
    tokens = torch.randint(vocab_size, (cfg.data.batch_size, cfg.data.seq_len + 1))

    def run() -> None:
        for _ in range(steps):
            plain_training_step(model, optimizer, tokens, grad_clip=t.grad_clip)

    return run, sum(p.numel() for p in model.parameters())


def lm_pair(config_path: Path, case: LMCase) -> dict[str, Config]:
    cfg = load_config(config_path, list(case.overrides))
    dense = dataclasses.replace(cfg.model.ffn, kind="dense")
    moe = param_equal(dense, "sigma_moe", cfg.model.d_model, expert_size=case.expert_size, top_k=case.top_k)
    return {name: dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, ffn=ffn))
            for name, ffn in (("dense", dense), ("sigma_moe", moe))}


def lm_throughput(sizes: BenchSizes, config_path: Path) -> list[Measurement]:
    rows = []
    for case in sizes.lm_cases:
        configs = lm_pair(config_path, case)
        rounds, params = {}, {}
        for name, cfg in configs.items():
            vocab = cfg.data.synthetic.vocab_size
            rounds[name], params[name] = training_round(cfg, vocab, case.steps_per_round)
        seconds = interleaved_medians(rounds, sizes.lm_rounds)
        case_rows = []
        for name, cfg in configs.items():
            f, d = cfg.model.ffn, cfg.data
            tokens = d.batch_size * d.seq_len * case.steps_per_round
            ffn = ffn_sizes(f)
            case_rows.append(Measurement(
                "lm", case.name, name, "train_tokens_per_s", tokens / seconds[name],
                note=f"{params[name]:,} params, {ffn}, batch {d.batch_size}x{d.seq_len}, "
                     "random tokens, AdamW steps",
            ))
        rows += with_ratios(case_rows, "dense")
    return rows
