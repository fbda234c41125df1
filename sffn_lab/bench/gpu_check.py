"""``sffn bench --gpu-check``: the GPU acceptance check, one PASS / FAIL line per check.

1. Accuracy: forward and every gradient (x, keys, values, gates) of the Triton kernels and of the torch
   path against float64 on the GPU, in fp32 / bf16 / fp16, on shapes off the block multiples with
   skewed routing and an empty expert (whose weight gradients must be exactly zero); and one case with
   more than 2^31 elements in T·D (64-bit index arithmetic), checked on sampled rows.
2. Training: a few bf16-mixed steps of every FFN kind with the Triton backend, losses finite and close
   to the torch backend's.
3. Host syncs: a bf16-mixed forward+backward of each FFN kind's layer under
   ``torch.cuda.set_sync_debug_mode("error")`` (BASE excepted: its auction is data-dependent).
4. Speed: forward+backward of the σ-MoE expert bank against the FLOP-matched dense FFN (d_ff = K·G, the
   limit) and the parameter-matched dense FFN (d_ff = N_E·G) on cuBLAS, timed with CUDA events
   (``triton.testing.do_bench``), as ratios and TFLOP/s of active FLOPs.

Without CUDA it says so and passes. ``device="cpu"`` with ``quick`` sizes runs parts 1–3 under the
Triton interpreter (the test suite's way of keeping this code working without a GPU).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from sffn_lab.bench.accuracy import TOLERANCE, compare_with_float64, relative_error
from sffn_lab.kernels import RoutingPlan, expert_down, expert_up, triton_available
from sffn_lab.kernels.precision import fp32_matmul_precision

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Training agreement: the first loss is the same model and batch through two kernels (bf16 rounding only);
# later losses also carry the differences of earlier updates.
FIRST_LOSS_TOL, LAST_LOSS_TOL = 0.01, 0.05


@dataclass
class CheckResult:
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

    def line(self) -> str:
        return (f"speed  {self.case} {self.dtype}: σ-MoE (Triton) {self.moe_ms:.3f} ms = "
                f"{self.moe_ms / self.flop_matched_ms:.2f}× FLOP-matched dense ({self.flop_matched_ms:.3f} ms), "
                f"{self.moe_ms / self.param_matched_ms:.2f}× parameter-matched dense "
                f"({self.param_matched_ms:.3f} ms); torch path {self.torch_path_ms:.3f} ms; "
                f"{self.tflops:.1f} TFLOP/s active")


# ---------------------------------------------------------------------------------------------- accuracy
def accuracy_checks(device, quick: bool) -> Iterator[CheckResult]:
    T, K, E, D, G = (45, 2, 5, 40, 24) if quick else (3001, 4, 16, 520, 136)  # off the tile multiples
    backends = ["triton", "torch"] if triton_available() else ["torch"]
    for backend in backends:
        for dtype in DTYPES:
            with fp32_matmul_precision("highest"):
                result = compare_with_float64(backend, dtype, device, T, K, E, D, G, empty=(1,))
            empty_zero = all(bool(result.outputs[n][1].eq(0).all()) for n in ("dkeys", "dvalues"))
            worst = max(result.errors, key=result.errors.get)
            yield CheckResult(
                f"{backend} {str(dtype).removeprefix('torch.')} vs float64 (T {T}, K {K}, N_E {E}, D {D}, G {G})",
                result.worst() < TOLERANCE[dtype] and empty_zero,
                f"worst error {result.errors[worst]:.2e} in {worst} (tolerance {TOLERANCE[dtype]:.0e}); "
                f"empty expert's weight gradients {'exactly zero' if empty_zero else 'NOT zero'}",
            )
    if not quick and triton_available():
        yield large_index_check(device)


def large_index_check(device, T: int = 2_200_000, D: int = 1024, K: int = 1, E: int = 4, G: int = 16,
                      samples: int = 2048) -> CheckResult:
    """T·D > 2^31 elements in bf16: h, y and dx of sampled rows (the highest tokens included) vs float64."""
    x = torch.randn(T, D, device=device, dtype=torch.bfloat16).requires_grad_(True)
    keys = (torch.randn(E, D, G, device=device) * D**-0.5).bfloat16()
    values = (torch.randn(E, G, D, device=device) * G**-0.5).bfloat16()
    plan = RoutingPlan.of(torch.randint(0, E, (T, K), device=device), E)
    h = expert_up(x, keys, plan, backend="triton")
    y = expert_down(torch.relu(h), values, plan, None, backend="triton")
    dy = torch.randn(samples, D, device=device, dtype=torch.bfloat16)
    rows = torch.cat([torch.randint(0, T, (samples - 16,), device=device), torch.arange(T - 16, T, device=device)])
    grad_y = torch.zeros_like(y)
    grad_y[rows] = dy  # rows drawn twice get the later dy; the reference below uses what was stored
    y.backward(grad_y)
    idx = plan.indices[rows]
    x64, k64, v64 = x.detach()[rows].double(), keys.double(), values.double()
    h64 = torch.einsum("td,tkdg->tkg", x64, k64[idx])
    y64 = torch.einsum("tkg,tkgd->td", torch.relu(h64), v64[idx])
    # dx of the sampled rows: dy → relu' → keysᵀ (a row's gradient depends on its own dy only); relu' is
    # taken from the kernel's h, so that a bf16 h rounded across zero does not count as an error
    dh64 = torch.einsum("td,tkgd->tkg", grad_y[rows].double(), v64[idx]) * (h.detach()[rows] > 0)
    dx64 = torch.einsum("tkg,tkdg->td", dh64, k64[idx])
    errors = {"h": relative_error(h.detach()[rows], h64), "y": relative_error(y.detach()[rows], y64),
              "dx": relative_error(x.grad[rows], dx64)}
    worst = max(errors, key=errors.get)
    del x, h, y, grad_y
    torch.cuda.empty_cache()
    return CheckResult(
        f"triton bf16, {T * D:,} elements in T·D (> 2^31), sampled rows vs float64",
        errors[worst] < TOLERANCE[torch.bfloat16],
        f"worst error {errors[worst]:.2e} in {worst} (tolerance {TOLERANCE[torch.bfloat16]:.0e})",
    )


@contextmanager
def kernel_backend(backend: str) -> Iterator[None]:
    before = os.environ.get("SFFN_KERNEL")
    os.environ["SFFN_KERNEL"] = backend
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("SFFN_KERNEL")
        else:
            os.environ["SFFN_KERNEL"] = before


# ---------------------------------------------------------------------------------------------- training
def training_checks(device, quick: bool) -> Iterator[CheckResult]:
    from sffn_lab.config import FFN_KINDS, load_config

    size = (["model.d_model=32", "model.n_heads=2", "model.ffn.d_ff=64", "model.ffn.expert_size=16"] if quick
            else ["model.d_model=256", "model.n_heads=4", "model.ffn.d_ff=1024", "model.ffn.expert_size=128"])
    steps, seq_len, batch = (2, 16, 2) if quick else (5, 128, 16)
    for kind in FFN_KINDS:
        config = load_config(None, [*size, "model.n_layers=2", "model.ffn.n_experts=8", "model.ffn.top_k=2",
                                    f"model.ffn.kind={kind}"])
        losses = {backend: bf16_training_losses(config.model, device, steps, backend, seq_len=seq_len, batch=batch)
                  for backend in ("triton", "torch")}
        first = abs(losses["triton"][0] - losses["torch"][0])
        last = abs(losses["triton"][-1] - losses["torch"][-1])
        finite = all(math.isfinite(v) for ls in losses.values() for v in ls)
        yield CheckResult(
            f"{kind}: {steps} bf16-mixed training steps, Triton vs torch backend",
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
    with kernel_backend(backend):
        for _ in range(steps):
            tokens = torch.randint(0, vocab, (batch, seq_len + 1), generator=generator).to(device)
            losses.append(float(plain_training_step(model, optimizer, tokens, torch.bfloat16)))
    return losses


# ---------------------------------------------------------------------------------------------- host syncs
SYNCING_KINDS = {"base": "BASE's balanced assignment is an auction with data-dependent loops"}


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
    """One bf16-autocast forward+backward of each FFN kind's layer (Triton backend) with host syncs made errors,
    after two warm-up steps (the autotuner times its configs, which waits for the device, on a shape's first call).
    """
    from sffn_lab.config import FFN_KINDS

    for kind in FFN_KINDS:
        name = f"{kind}: no host sync in the layer"
        if kind in SYNCING_KINDS:
            yield CheckResult(name, True, f"not checked: {SYNCING_KINDS[kind]}")
            continue
        step = layer_step(kind, device, quick)
        with kernel_backend("triton"):
            step()
            step()
            try:
                with host_syncs_are_errors(device):
                    step()
            except RuntimeError as exc:
                yield CheckResult(name, False, str(exc).splitlines()[0])
            else:
                yield CheckResult(name, True, "bf16-mixed forward+backward, sync debug mode 'error'")


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


# ---------------------------------------------------------------------------------------------- speed
SPEED_CASES = [(T, D, E) for T in (8192, 65536) for D in (512, 1024) for E in (16, 128)]


def speed_rows(G: int = 128, K: int = 4) -> Iterator[SpeedRow]:
    for T, D, E in SPEED_CASES:
        for dtype in (torch.bfloat16, torch.float32):
            yield speed_row(T, D, E, G, K, dtype)
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


# ---------------------------------------------------------------------------------------------- driver
def run_gpu_check(say: Callable[[str], None], device: str = "cuda", quick: bool = False,
                  speed: bool = True) -> bool:
    """Run every check, calling ``say`` with one line each; True when all passed (or there is no GPU)."""
    if device == "cuda" and not torch.cuda.is_available():
        say("no CUDA GPU on this machine: nothing to check (the kernels are tested on the CPU by the test suite).")
        return True
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        say(f"device: {props.name}, {props.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, "
            f"triton {triton_version()}")
    if not triton_available():
        say("FAIL  triton: the Triton kernels cannot be imported; only the torch path was checked.")
    results = []
    for check in (accuracy_checks(device, quick), training_checks(device, quick), host_sync_checks(device, quick)):
        for result in check:
            say(result.line())
            results.append(result)
    if speed and device == "cuda" and triton_available():
        for row in speed_rows():
            say(row.line())
    passed = triton_available() and all(r.passed for r in results)
    say(f"{'PASS' if passed else 'FAIL'}: {sum(r.passed for r in results)} of {len(results)} checks passed")
    return passed


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


__all__ = ["CheckResult", "SpeedRow", "run_gpu_check"]
