"""``sffn bench --gpu-check``: the GPU acceptance check, in parts, each ending with one PASS / FAIL line.

1. configs: every autotuned config of both Triton kernels, each pinned alone, on the model's call path (h in
   the plan's order, fp32 gates, bf16 autocast over fp32 parameters) against float64: once with K a multiple
   of every BLOCK_K (D 512, G 128: EVEN_K) and the weight gradient as the GPU splits it, once off the block
   multiples (D 520, G 136) with one span per expert; skewed routing with an empty expert.
2. precisions: the same call path in every training precision (bf16-mixed, 16-mixed, 32-true with IEEE and
   with TF32 products, bf16-true), Triton and torch backends, against float64.
3. edges: T = 0 tokens through every backend, and every token on one expert.
4. large: more than 2^31 elements in T·D (64-bit index arithmetic), the weight gradients included.
5. training: a few bf16-mixed steps of every FFN kind, Triton backend against the torch backend.
6. host syncs: a bf16-mixed forward+backward of each FFN kind's layer under
   ``torch.cuda.set_sync_debug_mode("error")`` (BASE excepted: its assignment is data-dependent).
7. speed: forward+backward of the σ-MoE expert bank (autotuned) against the FLOP-matched dense FFN
   (d_ff = K·G: the limit) and the parameter-matched one (d_ff = N_E·G) on cuBLAS, CUDA-event timed; bf16 rows
   (``full``: fp32 too).
8. trainer: ``sffn train``'s own path (Lightning's Trainer, callbacks, checkpoints) for a dense and a σ-MoE LM at
   equal FLOPs per token, bf16-mixed, the σ-MoE also under ``train.compile``: the loss falls, the last checkpoint
   is written, no host sync inside a batch that logs nothing (each one found is named), tokens per second.

Parts 1–6 pin one config per kernel (part 1 each in turn), so they compile but never autotune; the trainer and
speed parts time configs (the trainer as any training run does). ``plan`` counts each part's Triton compiles and
autotune timings from the config lists and the pruning rules and estimates its time before anything runs
(``--dry-run`` prints it without a GPU); each result is written to ``gpu_check.json`` and ``gpu_check.md`` as soon
as it is known, so a run cut short still leaves what it measured. Without CUDA it says so and passes.
``device="cpu"`` with ``quick`` sizes runs parts 1–3, 5, 6 and 8 under the Triton interpreter (the test suite's
way of keeping this code working without a GPU).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lightning as L
import torch

from sffn_lab.bench.accuracy import TOLERANCE, compare_with_float64, relative_error
from sffn_lab.bench.kernel_resources import config_name
from sffn_lab.kernels import RoutingPlan, expert_down, expert_up, triton_available
from sffn_lab.kernels.backends import forced_backend
from sffn_lab.kernels.precision import fp32_matmul_precision
from sffn_lab.markdown import markdown_table
from sffn_lab.run_dir import RunDir

# Training agreement: the first loss is the same model and batch through two kernels (bf16 rounding only);
# later losses also carry the differences of earlier updates.
FIRST_LOSS_TOL, LAST_LOSS_TOL = 0.01, 0.05
# TF32 keeps 10 mantissa bits, as fp16 does, and accumulates in fp32: fp16's products' error, with 2× room
# for the longer exponent's larger values. An assumption until a GPU run measures it.
TF32_TOLERANCE = 1e-2
# The estimate's unit costs, assumed until a GPU run measures them (the check prints what it measured):
# one Triton compile for sm_90 (0.3 s on the 2-core Xeon VM for sm_90a, ptxas included; a GPU host loads
# the module too), one autotune timing (triton's do_bench: 25 ms warm-up, 100 ms of repetitions).
COMPILE_S, TIMING_S = 0.5, 0.15
BUDGET_S = 330  # the default check must fit five and a half minutes on one H100 from a cold Triton cache


@dataclass
class CheckResult:
    part: str
    name: str
    passed: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'}  {self.name}: {self.detail}"


@dataclass
class SpeedRow:
    """One size and dtype: milliseconds of forward+backward and TFLOP/s of the expert bank's active FLOPs."""

    case: str
    dtype: str
    moe_ms: float
    torch_path_ms: float
    flop_matched_ms: float
    param_matched_ms: float
    tflops: float
    part: str = "speed"

    def line(self) -> str:
        return (f"speed  {self.case} {self.dtype}: σ-MoE (Triton) {self.moe_ms:.3f} ms = "
                f"{self.moe_ms / self.flop_matched_ms:.2f}× FLOP-matched dense ({self.flop_matched_ms:.3f} ms), "
                f"{self.moe_ms / self.param_matched_ms:.2f}× parameter-matched dense "
                f"({self.param_matched_ms:.3f} ms); torch path {self.torch_path_ms:.3f} ms; "
                f"{self.tflops:.1f} TFLOP/s active")


@dataclass
class Part:
    """One part of the check: what it runs, its Triton compiles and autotune timings (counted before it runs),
    an estimate of its seconds, and what it measured."""

    name: str
    what: str
    compiles: int
    timings: int
    run_s: float  # the part's own work besides compiling and autotuning (an estimate)
    results: Callable[[], Iterator[CheckResult | SpeedRow]]
    measured: dict = field(default_factory=dict)

    def estimate_s(self) -> float:
        return self.compiles * COMPILE_S + self.timings * TIMING_S + self.run_s


# ---------------------------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class Shape:
    T: int
    K: int
    E: int
    D: int
    G: int

    def __str__(self) -> str:
        return f"T {self.T}, K {self.K}, N_E {self.E}, D {self.D}, G {self.G}"


def accuracy_shapes(quick: bool) -> tuple[Shape, Shape]:
    """(K a multiple of every BLOCK_K, K off the block multiples); several tiles per expert, a partial last one."""
    if quick:
        return Shape(45, 2, 5, 64, 32), Shape(45, 2, 5, 40, 24)
    return Shape(3001, 4, 16, 512, 128), Shape(3001, 4, 16, 520, 136)


# ---------------------------------------------------------------------------------------------- pinning
def _autotuned_kernels():
    from sffn_lab.kernels import triton_gather_matmul, triton_weight_grad

    return triton_gather_matmul.gather_matmul_kernel, triton_weight_grad.weight_grad_kernel


def gpu_configs() -> tuple[list, list]:
    """The config lists of the gathered matmul and of the weight gradient on a GPU (what a plan counts, also
    where the interpreter runs one config)."""
    from sffn_lab.kernels import triton_gather_matmul, triton_weight_grad

    return triton_gather_matmul.configs(interpreted=False), triton_weight_grad.configs(interpreted=False)


@contextmanager
def pinned_configs(gather_index: int = 0, grad_index: int = 0) -> Iterator[str]:
    """Both autotuners hold one config each inside the block (so they launch it without timing anything);
    yields its name."""
    kernels = _autotuned_kernels()
    saved = [k.configs for k in kernels]
    chosen = [saved[0][gather_index % len(saved[0])], saved[1][grad_index % len(saved[1])]]
    try:
        for kernel, config in zip(kernels, chosen, strict=True):
            kernel.configs = [config]
        yield " / ".join(config_name(c.kwargs, c.num_warps) for c in chosen)
    finally:
        for kernel, configs in zip(kernels, saved, strict=True):
            kernel.configs = configs


@contextmanager
def whole_spans() -> Iterator[None]:
    """The weight gradient keeps one span per expert inside the block, whatever the GPU's size would choose."""
    from sffn_lab.kernels import triton_ops

    saved = triton_ops.rows_per_span
    triton_ops.rows_per_span = lambda P, *shape: max(P, 1)
    try:
        yield
    finally:
        triton_ops.rows_per_span = saved


# ---------------------------------------------------------------------------------------------- 1. configs
def config_checks(device, quick: bool) -> Iterator[CheckResult]:
    """Every config of each kernel pinned in turn (the shorter list wraps), bf16 autocast model path, both shapes."""
    even, odd = accuracy_shapes(quick)
    n_gather, n_grad = (len(k.configs) for k in _autotuned_kernels())
    for i in range(max(n_gather, n_grad)):
        for shape, spans in ((even, "as the GPU splits it"), (odd, "one span per expert")):
            with pinned_configs(i, i) as name, (whole_spans() if shape is odd else nullcontext()):
                result = compare_with_float64("triton", torch.float32, device, shape.T, shape.K, shape.E, shape.D,
                                              shape.G, expert_order=True, autocast=torch.bfloat16)
            yield _accuracy_result("configs", f"config {name}, {shape}, weight gradient {spans}", result,
                                   TOLERANCE[torch.bfloat16])


def _accuracy_result(part: str, name: str, result, tolerance: float, empty_expert: int | None = 1) -> CheckResult:
    empty_zero = empty_expert is None or all(bool(result.outputs[n][empty_expert].eq(0).all())
                                             for n in ("dkeys", "dvalues"))
    worst = max(result.errors, key=result.errors.get)
    return CheckResult(
        part, name, result.worst() < tolerance and empty_zero,
        f"worst error {result.errors[worst]:.2e} in {worst} (tolerance {tolerance:.0e})"
        + ("" if empty_expert is None else
           f"; empty expert's weight gradients {'exactly zero' if empty_zero else 'NOT zero'}"),
    )


# ---------------------------------------------------------------------------------------------- 2. precisions
# name → (parameter dtype, autocast dtype or None, float32 matmul precision, tolerance)
PRECISIONS = {
    "bf16-mixed": (torch.float32, torch.bfloat16, "highest", TOLERANCE[torch.bfloat16]),
    "16-mixed": (torch.float32, torch.float16, "highest", TOLERANCE[torch.float16]),
    "32-true (IEEE)": (torch.float32, None, "highest", TOLERANCE[torch.float32]),
    "32-true (TF32)": (torch.float32, None, "high", TF32_TOLERANCE),
    "bf16-true": (torch.bfloat16, None, "highest", TOLERANCE[torch.bfloat16]),
}


def backends() -> list[str]:
    return ["triton", "torch"] if triton_available() else ["torch"]


def precision_checks(device, quick: bool) -> Iterator[CheckResult]:
    _, shape = accuracy_shapes(quick)
    for backend in backends():
        for precision, (dtype, autocast, matmul, tolerance) in PRECISIONS.items():
            with pinned_configs(), fp32_matmul_precision(matmul):
                result = compare_with_float64(backend, dtype, device, shape.T, shape.K, shape.E, shape.D, shape.G,
                                              expert_order=True, autocast=autocast)
            yield _accuracy_result("precisions", f"{backend} {precision} vs float64 ({shape})", result, tolerance)


# ---------------------------------------------------------------------------------------------- 3. edges
def edge_checks(device, quick: bool) -> Iterator[CheckResult]:
    shape, _ = accuracy_shapes(quick)
    no_tokens = torch.empty(0, shape.K, dtype=torch.long)
    for backend in [*backends(), "reference"]:
        with pinned_configs():
            result = compare_with_float64(backend, torch.float32, device, 0, shape.K, shape.E, shape.D, shape.G,
                                          expert_order=True, autocast=torch.bfloat16, indices=no_tokens)
        shapes_ok = result.outputs["y"].shape == (0, shape.D) and result.outputs["dx"].shape == (0, shape.D)
        zero = all(bool(result.outputs[n].eq(0).all()) for n in ("dkeys", "dvalues"))
        yield CheckResult("edges", f"{backend}: T = 0 tokens, forward and backward", shapes_ok and zero,
                          f"y {tuple(result.outputs['y'].shape)}, weight gradients "
                          f"{'all zero' if zero else 'NOT zero'}")
    one_expert = torch.full((shape.T, 1), shape.E - 1, dtype=torch.long)
    for backend in backends():
        with pinned_configs():
            result = compare_with_float64(backend, torch.float32, device, shape.T, 1, shape.E, shape.D, shape.G,
                                          expert_order=True, autocast=torch.bfloat16, indices=one_expert)
        yield _accuracy_result("edges", f"{backend}: all {shape.T} tokens on one expert, bf16-mixed", result,
                               TOLERANCE[torch.bfloat16], empty_expert=0)


# ---------------------------------------------------------------------------------------------- 4. large
def large_index_check(device, T: int = 2_200_000, D: int = 1024, K: int = 1, E: int = 4, G: int = 16,
                      samples: int = 2048) -> CheckResult:
    """T·D > 2^31 elements in bf16: h, y and dx of sampled rows (the highest tokens included) and both weight
    gradients vs float64. Only the sampled rows get an output gradient, so every gradient is a sum over them."""
    x = torch.randn(T, D, device=device, dtype=torch.bfloat16).requires_grad_(True)
    keys = (torch.randn(E, D, G, device=device) * D**-0.5).bfloat16().requires_grad_(True)
    values = (torch.randn(E, G, D, device=device) * G**-0.5).bfloat16().requires_grad_(True)
    plan = RoutingPlan.of(torch.randint(0, E, (T, K), device=device), E)
    with pinned_configs():
        h = expert_up(x, keys, plan, backend="triton")
        y = expert_down(torch.relu(h), values, plan, None, backend="triton")
        rows = torch.cat([torch.randint(0, T - 16, (samples - 16,), device=device),
                          torch.arange(T - 16, T, device=device)]).unique()
        grad_y = torch.zeros_like(y)
        grad_y[rows] = torch.randn(rows.shape[0], D, device=device, dtype=torch.bfloat16)
        y.backward(grad_y)
    idx = plan.indices[rows]
    x64, k64, v64, dy64 = x.detach()[rows].double(), keys.detach().double(), values.detach().double(), \
        grad_y[rows].double()
    h64 = torch.einsum("td,tkdg->tkg", x64, k64[idx])
    y64 = torch.einsum("tkg,tkgd->td", torch.relu(h64), v64[idx])
    # relu' is taken from the kernel's h, so that a bf16 h rounded across zero does not count as an error
    relu_kernel = (h.detach()[rows] > 0).double()
    dh64 = torch.einsum("td,tkgd->tkg", dy64, v64[idx]) * relu_kernel
    dx64 = torch.einsum("tkg,tkdg->td", dh64, k64[idx])
    dkeys64 = torch.zeros_like(k64).index_put_((idx,), torch.einsum("td,tkg->tkdg", x64, dh64), accumulate=True)
    hidden64 = torch.relu(h.detach()[rows].double())  # the kernel's h, as its backward reads it
    dvalues64 = torch.zeros_like(v64).index_put_((idx,), torch.einsum("tkg,td->tkgd", hidden64, dy64),
                                                 accumulate=True)
    errors = {"h": relative_error(h.detach()[rows], h64), "y": relative_error(y.detach()[rows], y64),
              "dx": relative_error(x.grad[rows], dx64), "dkeys": relative_error(keys.grad, dkeys64),
              "dvalues": relative_error(values.grad, dvalues64)}
    worst = max(errors, key=errors.get)
    del x, h, y, grad_y
    torch.cuda.empty_cache()
    return CheckResult(
        "large", f"triton bf16, {T * D:,} elements in T·D (> 2^31), {rows.shape[0]} sampled rows and both weight "
        "gradients vs float64", errors[worst] < TOLERANCE[torch.bfloat16],
        f"worst error {errors[worst]:.2e} in {worst} (tolerance {TOLERANCE[torch.bfloat16]:.0e})",
    )


# ---------------------------------------------------------------------------------------------- 5. training
def training_checks(device, quick: bool) -> Iterator[CheckResult]:
    from sffn_lab.config import load_config
    from sffn_lab.variants import kinds

    size = (["model.d_model=32", "model.n_heads=2", "model.ffn.d_ff=64", "model.ffn.expert_size=16"] if quick
            else ["model.d_model=256", "model.n_heads=4", "model.ffn.d_ff=1024", "model.ffn.expert_size=128"])
    steps, seq_len, batch = (2, 16, 2) if quick else (5, 128, 16)
    for kind in kinds():
        config = load_config(None, [*size, "model.n_layers=2", "model.ffn.n_experts=8", "model.ffn.top_k=2",
                                    f"model.ffn.kind={kind}"])
        with pinned_configs():
            losses = {backend: bf16_training_losses(config.model, device, steps, backend, seq_len=seq_len,
                                                    batch=batch) for backend in ("triton", "torch")}
        first = abs(losses["triton"][0] - losses["torch"][0])
        last = abs(losses["triton"][-1] - losses["torch"][-1])
        finite = all(math.isfinite(v) for ls in losses.values() for v in ls)
        yield CheckResult(
            "training", f"{kind}: {steps} bf16-mixed training steps, Triton vs torch backend",
            finite and first < FIRST_LOSS_TOL and last < LAST_LOSS_TOL,
            f"losses {fmt(losses['triton'])} vs {fmt(losses['torch'])}; |Δ| first {first:.1e} "
            f"(< {FIRST_LOSS_TOL}), last {last:.1e} (< {LAST_LOSS_TOL})",
        )


def fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in values) + "]"


def bf16_training_losses(model_config, device, steps: int, backend: str, seq_len: int, batch: int,
                         vocab: int = 256) -> list[float]:
    """The training losses of ``steps`` AdamW steps under bf16 autocast, same init and batches for any backend."""
    from sffn_lab.models import build_model
    from sffn_lab.models.plain_step import plain_training_step

    torch.manual_seed(0)
    model = build_model(model_config, vocab, seq_len).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)
    losses = []
    with forced_backend(backend):
        for _ in range(steps):
            tokens = torch.randint(0, vocab, (batch, seq_len + 1), generator=generator).to(device)
            losses.append(float(plain_training_step(model, optimizer, tokens, torch.bfloat16)))
    return losses


# ---------------------------------------------------------------------------------------------- 6. host syncs


@contextmanager
def host_syncs_are_errors(device) -> Iterator[None]:
    """On CUDA, every operation that waits for the device raises inside the block; elsewhere a no-op."""
    if torch.device(device).type != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def host_sync_checks(device, quick: bool) -> Iterator[CheckResult]:
    """One bf16-autocast forward+backward of each FFN kind's layer (Triton backend, one pinned config, so nothing
    is timed) with host syncs made errors, after two warm-up steps (compiles); a variant that syncs by design
    (``Variant.host_syncs``) is named, not checked."""
    from sffn_lab.variants import kinds, variant

    for kind in kinds():
        name = f"{kind}: no host sync in the layer"
        if (why := variant(kind).host_syncs) is not None:
            yield CheckResult("host syncs", name, True, f"not checked: {why}")
            continue
        step = layer_step(kind, device, quick)
        with forced_backend("triton"), pinned_configs():
            step()
            step()
            try:
                with host_syncs_are_errors(device):
                    step()
            except RuntimeError as exc:
                yield CheckResult("host syncs", name, False, str(exc).splitlines()[0])
            else:
                yield CheckResult("host syncs", name, True, "bf16-mixed forward+backward, sync debug mode 'error'")


def layer_step(kind: str, device, quick: bool) -> Callable[[], None]:
    """A bf16-autocast forward+backward of one FFN layer of ``kind`` on a fixed batch [B, S, D]."""
    from sffn_lab.config import load_config
    from sffn_lab.layers.factory import build_ffn

    size = (["model.d_model=32", "model.ffn.d_ff=64", "model.ffn.expert_size=16"] if quick
            else ["model.d_model=512", "model.ffn.d_ff=2048", "model.ffn.expert_size=128"])
    batch, seq_len, vocab = (2, 16, 256) if quick else (8, 512, 256)
    config = load_config(None, [*size, "model.ffn.n_experts=8", "model.ffn.top_k=2", f"model.ffn.kind={kind}"])
    torch.manual_seed(0)
    layer = build_ffn(config.model.ffn, config.model.d_model, 2, vocab).to(device)
    x = torch.randn(batch, seq_len, config.model.d_model, device=device, requires_grad=True)
    ids = torch.randint(0, vocab, (batch, seq_len), device=device)

    def step() -> None:
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            out = layer(x, ids)
        loss = out.y.float().square().mean()
        (loss if out.aux_loss is None else loss + out.aux_loss).backward()

    return step


# ---------------------------------------------------------------------------------------------- 8. trainer
class HostSyncCounter(L.Callback):
    """Counts the host syncs CUDA's sync debug mode reports inside training batches that log nothing (the
    loop's fetch of the next batch excepted: it runs before ``on_train_batch_start``), after ``warmup`` steps
    (autotuning times configs, which waits for the device). ``syncs`` holds "file:line: message" of each."""

    def __init__(self, warmup: int):
        self.warmup, self.batches, self.syncs = warmup, 0, []
        self._caught = self._records = None

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step < self.warmup or module.is_log_step() or not torch.cuda.is_available():
            return
        self.batches += 1
        self._caught = warnings.catch_warnings(record=True)
        self._records = self._caught.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self._caught is None:
            return
        torch.cuda.set_sync_debug_mode("default")
        self._caught.__exit__(None, None, None)
        self.syncs += [f"{Path(w.filename).name}:{w.lineno}: {str(w.message).splitlines()[0]}" for w in self._records
                       if "synchroniz" in str(w.message)]
        self._caught = self._records = None


TRAINER_SIZE = ["model.d_model=256", "model.n_layers=4", "model.n_heads=4", "data.seq_len=256", "data.batch_size=32",
                "train.max_steps=120", "train.log_every=40", "train.val_every=120", "train.val_batches=4",
                "train.warmup_steps=20",
                "train.precision=bf16-mixed"]
TRAINER_QUICK = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "data.seq_len=16", "data.batch_size=4",
                 "train.max_steps=6", "train.log_every=3", "train.val_every=6", "train.val_batches=1",
                 "train.precision=32-true", "data.synthetic.train_tokens=20000", "data.synthetic.valid_tokens=2000"]
# Dense and σ-MoE at the same FLOPs per token (K·G = d_ff = 512), the σ-MoE also compiled.
TRAINER_RUNS = {
    "dense": ["model.ffn.kind=dense", "model.ffn.d_ff=512"],
    "sigma_moe": ["model.ffn.kind=sigma_moe", "model.ffn.n_experts=16", "model.ffn.expert_size=128",
                  "model.ffn.top_k=4"],
    "sigma_moe compiled": ["model.ffn.kind=sigma_moe", "model.ffn.n_experts=16", "model.ffn.expert_size=128",
                           "model.ffn.top_k=4", "train.compile=true"],
}
TRAINER_QUICK_RUNS = {"sigma_moe": ["model.ffn.kind=sigma_moe", "model.ffn.n_experts=4", "model.ffn.expert_size=8",
                                    "model.ffn.top_k=2"]}


def trainer_checks(device, quick: bool) -> Iterator[CheckResult]:
    """sffn's own training (``training.train``: Lightning's Trainer, the toolkit's callbacks, checkpoints and
    loggers) of a dense and a σ-MoE LM at equal FLOPs per token, bf16-mixed on the GPU: a validation loss 0.1 nat
    under the uniform prediction's (finite at toy sizes), the last checkpoint written, no host sync between log
    steps (``HostSyncCounter``; each found is named), and the tokens per second of each (wall time of the whole
    fit, validation and compiles included)."""
    import tempfile

    from sffn_lab import training
    from sffn_lab.config import load_config

    size, runs = (TRAINER_QUICK, TRAINER_QUICK_RUNS) if quick else (TRAINER_SIZE, TRAINER_RUNS)
    size = [*size, f"train.accelerator={'gpu' if torch.device(device).type == 'cuda' else 'cpu'}"]
    for name, overrides in runs.items():
        with tempfile.TemporaryDirectory() as out:
            config = load_config(None, [*size, *overrides, "train.loggers=csv", f"train.out_dir={out}"])
            counter = HostSyncCounter(warmup=2)
            summary = training.train(config, progress=False, extra_callbacks=[counter])
            last = RunDir(summary.run_dir).last_checkpoint
            start_loss = math.log(config.data.synthetic.vocab_size)
            finite = summary.val_loss is not None and math.isfinite(summary.val_loss)
            learned = finite and (quick or summary.val_loss < start_loss - 0.1)  # toy sizes: too few steps to learn
            syncs = sorted(set(counter.syncs))
            yield CheckResult(
                "trainer", f"{name}: {summary.step} steps of sffn's training, {config.train.precision}",
                learned and last.is_file() and not syncs and summary.step == config.train.max_steps,
                f"val loss {summary.val_loss if finite else float('nan'):.3f} (uniform {start_loss:.3f}); "
                f"{summary.tokens_seen / summary.wall_time_s:,.0f} tokens/s over the whole fit; "
                f"last.ckpt {'written' if last.is_file() else 'MISSING'}; "
                f"{len(counter.syncs)} host syncs in {counter.batches} non-log batches"
                + (f": {'; '.join(syncs[:3])}" if syncs else ""),
            )


# ---------------------------------------------------------------------------------------------- 7. speed
SPEED_CASES = [(T, D, E) for T in (8192, 65536) for D in (512, 1024) for E in (16, 128)]
SPEED_G, SPEED_K = 128, 4


def speed_dtypes(full: bool) -> tuple[torch.dtype, ...]:
    return (torch.bfloat16, torch.float32) if full else (torch.bfloat16,)


def speed_rows(full: bool) -> Iterator[SpeedRow]:
    for T, D, E in SPEED_CASES:
        for dtype in speed_dtypes(full):
            yield speed_row(T, D, E, SPEED_G, SPEED_K, dtype)
            torch.cuda.empty_cache()


def speed_row(T: int, D: int, E: int, G: int, K: int, dtype: torch.dtype) -> SpeedRow:
    """Forward+backward of the σ-MoE expert bank (Triton and torch path) and of the two dense FFNs, in ms."""
    import triton.testing

    from sffn_lab.layers.dense import DenseFFN

    torch.manual_seed(0)
    x = torch.randn(T, D, device="cuda", dtype=dtype, requires_grad=True)
    keys = (torch.randn(E, D, G, device="cuda", dtype=dtype) * D**-0.5).requires_grad_(True)
    values = (torch.randn(E, G, D, device="cuda", dtype=dtype) * G**-0.5).requires_grad_(True)
    gates = torch.rand(T, K, device="cuda", requires_grad=True)
    indices = torch.rand(T, E, device="cuda").topk(K, dim=1).indices
    dy = torch.randn(T, D, device="cuda", dtype=dtype)

    def moe(backend: str) -> Callable[[], None]:
        def step() -> None:
            plan = RoutingPlan.of(indices, E)  # once per layer, as the expert bank does, h in its expert order
            h = expert_up(x, keys, plan, backend, expert_order=True)
            expert_down(torch.relu(h), values, plan, gates, backend, expert_order=True).backward(dy)
        return step

    def dense(d_ff: int) -> Callable[[], None]:
        layer = DenseFFN(D, d_ff).to("cuda", dtype)
        return lambda: layer(x).y.backward(dy)

    def time_ms(fn: Callable[[], None]) -> float:
        return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=[x, keys, values, gates])

    moe_ms = time_ms(moe("triton"))
    active_flops = 3 * 2 * 2 * T * K * G * D  # two products, forward and two backward products each
    return SpeedRow(
        case=f"T {T}, D {D}, N_E {E}, G {G}, K {K}",
        dtype=str(dtype).removeprefix("torch."),
        moe_ms=moe_ms,
        torch_path_ms=time_ms(moe("torch")),
        flop_matched_ms=time_ms(dense(K * G)),
        param_matched_ms=time_ms(dense(E * G)),
        tflops=active_flops / (moe_ms * 1e-3) / 1e12,
    )


def speed_timings(full: bool) -> int:
    """Autotune timings of the speed part: the configs each launch's autotuner keeps after pruning, for every
    distinct tuning key (per case and dtype: four gathered-matmul launches, two weight gradients)."""
    from sffn_lab.kernels import triton_gather_matmul, triton_weight_grad
    from sffn_lab.kernels.triton_ops import _rows_hint

    gather, grad = gpu_configs()
    total = 0
    for T, D, E in SPEED_CASES:
        rows = _rows_hint(T * SPEED_K // E)
        for N, K_in in ((SPEED_G, D), (D, SPEED_G), (SPEED_G, D), (D, SPEED_G)):  # up, down, dh, dx
            total += len(triton_gather_matmul.prune(gather, {"N": N, "K": K_in, "rows_hint": rows}))
        for d_in, J in ((D, SPEED_G), (SPEED_G, D)):  # up dW, down dW
            total += len(triton_weight_grad.prune(grad, {"d_in": d_in, "J": J, "rows_hint": rows}))
    return total * len(speed_dtypes(full))


# ---------------------------------------------------------------------------------------------- the plan
LAUNCHES = 4 + 2 + 1  # a layer step's launch kinds: four gathered products, two weight gradients, the span sums


def plan(device="cuda", quick: bool = False, full: bool = False) -> list[Part]:
    """The parts in order, with the Triton compiles and autotune timings each will add (compiles: the distinct
    specialisations it launches that no earlier part compiled, times the configs it runs; none where the
    interpreter runs the kernels) and an estimate of its time."""
    from sffn_lab.variants import bank_kinds, kinds

    on_gpu = torch.device(device).type == "cuda"
    if not triton_available():
        n_gather = n_grad = 0
    elif on_gpu:
        n_gather, n_grad = (len(c) for c in gpu_configs())
    else:
        n_gather, n_grad = (len(k.configs) for k in _autotuned_kernels())
    launches = LAUNCHES if on_gpu else 0
    n_bank_kinds = len(bank_kinds())  # dense, Top-K and PKM do not use the expert bank
    parts = [
        Part("configs", "every config of both kernels alone, bf16 model path, EVEN_K and not, vs float64",
             on_gpu * 2 * (4 * n_gather + 2 * n_grad + 1), 0, 2 * max(n_gather, n_grad) * 0.3,
             lambda: config_checks(device, quick)),
        Part("precisions", f"{', '.join(PRECISIONS)}; Triton and torch backends vs float64",
             (len(PRECISIONS) - 1) * launches, 0, 2 * len(PRECISIONS) * 0.3,
             lambda: precision_checks(device, quick)),
        Part("edges", "T = 0 through every backend; every token on one expert", 2 * launches, 0, 2,
             lambda: edge_checks(device, quick)),
    ]
    if on_gpu and not quick:
        parts.append(Part("large", "> 2^31 elements in T·D, both weight gradients", LAUNCHES, 0, 15,
                          lambda: iter([large_index_check(device)])))
    parts += [
        Part("training", "bf16-mixed steps of every FFN kind, Triton vs torch", 2 * launches, 0,
             len(kinds()) * 1.5, lambda: training_checks(device, quick)),
        Part("host syncs", "every FFN kind's layer under sync debug mode 'error'", 2 * launches, 0,
             n_bank_kinds * 0.5, lambda: host_sync_checks(device, quick)),
    ]
    if on_gpu and not quick:
        cases = len(SPEED_CASES) * len(speed_dtypes(full))
        # bf16 specialisations are compiled by then, but the whole-span weight gradients (large N_E) are new
        # in every config; fp32 (``full``) compiles every launch's configs anew
        new_compiles = 2 * n_grad + (full and (4 * n_gather + 4 * n_grad + 1))
        parts.append(Part("speed", f"σ-MoE bank vs dense on cuBLAS, {cases} rows", new_compiles,
                          speed_timings(full), cases * 1.5, lambda: speed_rows(full)))
    # new shapes (D 256, G 128) autotune each launch's configs once; the compiled run adds Inductor's own work
    trainer = Part("trainer", "sffn's Lightning training, dense and σ-MoE LMs (one compiled), host syncs counted",
                   launches * max(n_gather, n_grad), on_gpu * (4 * n_gather + 3 * n_grad),
                   (45 if on_gpu and not quick else 5) * len(TRAINER_QUICK_RUNS if quick else TRAINER_RUNS) / 2,
                   lambda: trainer_checks(device, quick))
    return [*parts, trainer]  # last: the compiled run's time is the least predictable


def describe_plan(parts: list[Part]) -> list[str]:
    lines = [f"{p.name}: {p.what}; {p.compiles} compiles, {p.timings} autotune timings, ~{p.estimate_s():.0f} s"
             for p in parts]
    total = sum(p.estimate_s() for p in parts)
    lines.append(f"total: {sum(p.compiles for p in parts)} compiles, {sum(p.timings for p in parts)} autotune "
                 f"timings, estimated {total:.0f} s ({COMPILE_S} s a compile, {TIMING_S} s a timing: assumed) "
                 f"against a budget of {BUDGET_S} s")
    return lines


# ---------------------------------------------------------------------------------------------- records
@contextmanager
def counting_compiles() -> Iterator[list[int]]:
    """Counts Triton compiles (or disk-cache loads) inside the block: the returned list holds the count (None
    where Triton has no compile hook: before triton 3.4)."""
    try:
        from triton import knobs
    except ImportError:
        yield [None]
        return

    count = [0]
    before = knobs.runtime.jit_cache_hook

    def hook(*args, **kwargs):
        count[0] += 1
        return before(*args, **kwargs) if before is not None else None

    knobs.runtime.jit_cache_hook = hook
    try:
        yield count
    finally:
        knobs.runtime.jit_cache_hook = before


class Record:
    """The check's results as they arrive, rewritten to OUT/gpu_check.json and gpu_check.md after each one."""

    def __init__(self, out: Path | None, header: dict):
        self.out, self.header, self.results, self.parts = out, header, [], []
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)

    def add(self, result: CheckResult | SpeedRow) -> None:
        self.results.append(result)
        self.write()

    def finish_part(self, part: Part) -> None:
        self.parts.append(part)
        self.write()

    def write(self) -> None:
        if self.out is None:
            return
        data = {**self.header, "parts": [{"name": p.name, "estimate_s": round(p.estimate_s(), 1),
                                          "compiles_planned": p.compiles, "timings_planned": p.timings,
                                          **p.measured} for p in self.parts],
                "results": [asdict(r) for r in self.results]}
        _write_atomically(self.out / "gpu_check.json", json.dumps(data, indent=1, ensure_ascii=False))
        _write_atomically(self.out / "gpu_check.md", self.markdown())

    def markdown(self) -> str:
        lines = [f"# GPU check: {self.header.get('device', '')}", "",
                 ", ".join(f"{k} {v}" for k, v in self.header.items() if k != "device"), ""]
        checks = [r for r in self.results if isinstance(r, CheckResult)]
        lines += markdown_table(("part", "check", "result", "detail"),
                                [(r.part, r.name, "PASS" if r.passed else "FAIL", r.detail) for r in checks])
        speed = [r for r in self.results if isinstance(r, SpeedRow)]
        if speed:
            lines += ["", *markdown_table(
                ("case", "dtype", "σ-MoE Triton ms", "÷ FLOP-matched dense", "÷ parameter-matched dense",
                 "torch path ms", "TFLOP/s active"),
                [(r.case, r.dtype, f"{r.moe_ms:.3f}", f"{r.moe_ms / r.flop_matched_ms:.2f}×",
                  f"{r.moe_ms / r.param_matched_ms:.2f}×", f"{r.torch_path_ms:.3f}", f"{r.tflops:.1f}")
                 for r in speed])]
        if self.parts:
            lines += ["", *markdown_table(
                ("part", "seconds", "estimated", "compiles", "planned", "autotune timings planned"),
                [(p.name, f"{p.measured.get('seconds', 0):.1f}", f"{p.estimate_s():.0f}",
                  str(p.measured.get("compiles", "")), str(p.compiles), str(p.timings)) for p in self.parts])]
        return "\n".join(lines) + "\n"


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_suffix(path.suffix + ".partial")
    partial.write_text(text)
    partial.replace(path)


# ---------------------------------------------------------------------------------------------- driver
def run_gpu_check(say: Callable[[str], None], device: str = "cuda", quick: bool = False, speed: bool = True,
                  full: bool = False, out: Path | None = None) -> bool:
    """Run every part, calling ``say`` with each line as it comes; True when all passed (or there is no GPU)."""
    if device == "cuda" and not torch.cuda.is_available():
        say("no CUDA GPU on this machine: nothing to check (the kernels are tested on the CPU by the test suite; "
            "--dry-run prints the plan).")
        return True
    header = {"torch": torch.__version__, "triton": triton_version()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        header["device"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, compute capability " \
                           f"{props.major}.{props.minor}"
    parts = [p for p in plan(device, quick, full) if speed or p.name != "speed"]
    say(f"device: {header.get('device', device)}, torch {header['torch']}, triton {header['triton']}")
    for line in describe_plan(parts):
        say(f"plan  {line}")
    if not triton_available():
        say("FAIL  triton: the Triton kernels cannot be imported; only the torch path is checked.")
    record = Record(out, header)
    verdicts = {}
    for part in parts:
        start = time.perf_counter()
        passed = True
        with counting_compiles() as compiles:
            for result in _results_or_failure(part):
                say(result.line())
                record.add(result)
                passed &= getattr(result, "passed", True)
        part.measured = {"seconds": round(time.perf_counter() - start, 1), "compiles": compiles[0]}
        record.finish_part(part)
        verdicts[part.name] = passed
        say(f"part {part.name}: {'PASS' if passed else 'FAIL'} in {part.measured['seconds']:.0f} s "
            f"(estimated {part.estimate_s():.0f}), {compiles[0]} compiles (planned {part.compiles})")
    for name, passed in verdicts.items():
        say(f"{'PASS' if passed else 'FAIL'}  part {name}")
    passed = triton_available() and all(verdicts.values())
    say(f"{'PASS' if passed else 'FAIL'}: {sum(verdicts.values())} of {len(verdicts)} parts passed"
        + (f"; wrote {out / 'gpu_check.json'} and gpu_check.md" if out is not None else ""))
    return passed


def _results_or_failure(part: Part) -> Iterator[CheckResult | SpeedRow]:
    """The part's results; an exception ends the part with a FAIL result naming it, and the check goes on."""
    try:
        yield from part.results()
    except Exception as exc:  # a crash in one part must not lose the parts after it
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        yield CheckResult(part.name, f"{part.name} stopped", False, f"{type(exc).__name__}: {message}")


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


__all__ = ["CheckResult", "Part", "SpeedRow", "describe_plan", "plan", "run_gpu_check"]
