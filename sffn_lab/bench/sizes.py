"""Problem sizes of a bench run: the issue's full sizes, or tiny ones for a seconds-long smoke run."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LMCase:
    """One LM pair: the base config with ``overrides``, as dense and as param-equal σ-MoE (G, K)."""

    name: str
    overrides: tuple[str, ...]
    expert_size: int
    top_k: int
    steps_per_round: int


@dataclass(frozen=True)
class BenchSizes:
    d_model: int
    d_ff: int
    n_experts: int
    expert_size: int
    top_k: int
    tokens: int
    sweep_experts: tuple[int, ...]
    sweep_expert_size: tuple[int, ...]
    sweep_top_k: tuple[int, ...]
    gshard_group: int  # tokens per GShard dispatch group
    capacity_factor: float
    repeats: int  # timed repetitions per variant (median reported)
    lm_rounds: int
    lm_cases: tuple[LMCase, ...] = field(default_factory=tuple)

    def case(self) -> str:
        return (f"T={self.tokens} D={self.d_model} N_E={self.n_experts} G={self.expert_size} K={self.top_k} "
                f"(dense d_ff={self.d_ff})")


FULL = BenchSizes(
    d_model=512, d_ff=2048, n_experts=16, expert_size=128, top_k=4, tokens=8192,
    sweep_experts=(8, 16, 32, 64, 128), sweep_expert_size=(32, 64, 128, 256, 512), sweep_top_k=(1, 2, 4, 8),
    gshard_group=512, capacity_factor=1.25, repeats=5, lm_rounds=5,
    lm_cases=(
        LMCase("default (d_model 128, 2 layers)", (), expert_size=64, top_k=2, steps_per_round=6),
        LMCase("wide (d_model 512, d_ff 2048, 2 layers)",
               ("model.d_model=512", "model.ffn.d_ff=2048", "model.n_heads=8", "data.batch_size=16"),
               expert_size=128, top_k=4, steps_per_round=2),
    ),
)

QUICK = BenchSizes(
    d_model=32, d_ff=64, n_experts=4, expert_size=16, top_k=2, tokens=256,
    sweep_experts=(2, 4, 8), sweep_expert_size=(8, 16, 32), sweep_top_k=(1, 2, 4),
    gshard_group=64, capacity_factor=1.25, repeats=2, lm_rounds=2,
    lm_cases=(
        LMCase("tiny", ("model.d_model=32", "model.n_heads=2", "model.ffn.d_ff=64", "data.seq_len=16",
                        "data.batch_size=4"), expert_size=16, top_k=2, steps_per_round=2),
    ),
)
