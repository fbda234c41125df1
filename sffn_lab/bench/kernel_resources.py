"""``sffn bench --kernel-resources``: every Triton launch of one expert layer's training step, compiled for a
Hopper GPU (sm_90a) on this machine with the specialisation the real call gets, no GPU needed.

The launches are captured from the real wrappers (``kernels/triton_ops.py``) run on CPU tensors of a layer's
shapes with the kernels replaced by recorders: the arguments, their strides and their alignments are the ones
a CUDA call passes. Triton's own argument binder then specialises them for the NVIDIA backend as a launch
would (16-byte-aligned pointers and integers divisible by 16 marked so, integers equal to 1 made constants),
and each autotuned config is compiled. What is read from the result:

- the main loop's global loads, from the PTX: bytes per thread per iteration by instruction width
  (``cp.async`` and ``ld.global``; TMA counted apart), against the bytes of the two operand tiles per thread;
- the loop's pipeline depth (buffers in flight, from ``cp.async.wait_group`` and the commit groups per
  iteration) and the matrix instruction (``wgmma`` or ``mma.sync``);
- registers per thread and spilled bytes from ``ptxas -v``, shared memory from the compiler's metadata.

These are static facts about the generated code, not timings: a config whose tiles load as scalars, that
spills, or that needs more shared memory than the GPU has, is slow or does not launch whatever the autotuner
measures. Triton's compiler and ptxas both ship in the triton wheel. A process that runs the kernels under the
interpreter cannot compile them (``TRITON_INTERPRET=1`` decorates them for the interpreter).
"""

from __future__ import annotations

import re
import subprocess
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from sffn_lab.markdown import markdown_table

HOPPER_CAPABILITY = 90
HOPPER_SHARED_BYTES = 232_448  # the most shared memory one H100 / H200 program may use (227 KB)
# The compiled variants: (the inputs' dtype, torch's float32 matmul precision while the wrappers run). fp32
# follows that precision as a cuBLAS matmul does: "high" multiplies in TF32, "highest" (torch's default) in
# IEEE fp32 on the CUDA cores.
DTYPES = {"bf16": (torch.bfloat16, "highest"), "fp16": (torch.float16, "highest"),
          "fp32 tf32": (torch.float32, "high"), "fp32 ieee": (torch.float32, "highest")}
VECTOR_BYTES = 16  # the widest load a thread issues: ld.global.v4.b32 or cp.async of 16 bytes


@dataclass(frozen=True)
class LayerShape:
    """The expert layer whose calls are compiled: T tokens, D model width, G expert width, E experts, K per token."""

    name: str
    T: int
    D: int
    G: int
    E: int
    K: int


# σ-MoE's enwik8 layer (d_model 512, N_E 16, G 128, K 4), a batch of 4096 tokens: every row 16-byte aligned.
PAPER_LAYER = LayerShape("D512 G128 E16 K4", 4096, 512, 128, 16, 4)
# WikiText-103-small's d_model 412: rows of 824 bytes, 8-byte aligned only, which Triton cannot vectorise.
UNALIGNED_LAYER = LayerShape("D412 G128 E16 K4", 4096, 412, 128, 16, 4)


@dataclass
class Launch:
    """One kernel launch as a wrapper makes it: the (autotuned) kernel object and its arguments."""

    product: str
    kernel: Any
    args: tuple
    kwargs: dict


@dataclass
class LoopLoads:
    """Global loads of a kernel's main loop per thread and iteration: bytes by (kind, instruction width)."""

    bytes_by_width: Counter = field(default_factory=Counter)  # (kind, width bytes) -> bytes; kind cp.async | ld
    tma: int = 0  # TMA (cp.async.bulk) instructions
    depth: int = 1  # buffers in flight: 1 when the loop's loads are synchronous

    def wide_bytes(self) -> int:
        return sum(b for (_, width), b in self.bytes_by_width.items() if width >= VECTOR_BYTES)

    def narrowest(self) -> int | None:
        return min((width for _, width in self.bytes_by_width), default=None)

    def describe(self) -> str:
        parts = [f"{kind} {width} B: {b} B" for (kind, width), b in sorted(self.bytes_by_width.items(),
                                                                          key=lambda kv: (-kv[0][1], kv[0][0]))]
        return "; ".join(parts + ([f"TMA ×{self.tma}"] if self.tma else [])) or "none"


@dataclass
class Resources:
    layer: str
    kernel: str
    product: str
    config: str
    dtype: str
    loads: LoopLoads
    tile_bytes: int  # bytes of the loop's operand tiles per thread and iteration (0: no operand tiles)
    mma: str
    registers: int
    spill_bytes: int
    shared_bytes: int

    def fits(self) -> bool:
        return self.shared_bytes <= HOPPER_SHARED_BYTES

    def tiles_vectorised(self) -> bool:
        """Every byte of the operand tiles goes through 16-byte loads (no scalar or partial-vector tile loads)."""
        return self.loads.wide_bytes() >= self.tile_bytes


# (the wrapper step that launched it, kernel) -> the product's name in the table
PRODUCTS = {
    ("up", "gather_matmul_kernel"): "up forward",
    ("down", "gather_matmul_kernel"): "down forward",
    ("down backward", "gather_matmul_kernel"): "down dh",
    ("down backward", "weight_grad_kernel"): "down dW",
    ("down backward", "sum_spans_kernel"): "down dW sums",
    ("up backward", "gather_matmul_kernel"): "up dx",
    ("up backward", "weight_grad_kernel"): "up dW",
    ("up backward", "sum_spans_kernel"): "up dW sums",
    ("up dW, split", "weight_grad_kernel"): "up dW, split",
    ("up dW, split", "sum_spans_kernel"): "up dW sums, split",
}


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records the launch instead of running it."""

    def __init__(self, kernel, launches: list[Launch], product: list[str]):
        self.kernel, self.launches, self.product = kernel, launches, product

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(Launch(self.product[0], self.kernel, args, kwargs))


def layer_launches(layer: LayerShape, dtype: torch.dtype, precision: str = "highest") -> list[Launch]:
    """Every Triton launch of one training step of an expert bank (σ-MoE's path: h in expert order, fp32 gates
    under mixed precision), captured from the wrappers on CPU tensors under the float32 matmul ``precision``;
    the weight gradient (with its span sums) both with one span per expert and cut into spans of MIN_SPAN_ROWS
    rows, as the GPU may cut a busy expert's rows."""
    from sffn_lab.kernels import triton_ops
    from sffn_lab.kernels.precision import fp32_matmul_precision
    from sffn_lab.kernels.routing_plan import RoutingPlan

    T, D, G, E, K = layer.T, layer.D, layer.G, layer.E, layer.K
    generator = torch.Generator().manual_seed(0)
    plan = RoutingPlan.of(torch.randint(0, E, (T, K), generator=generator), E)
    x, grad_y = torch.randn(T, D, dtype=dtype), torch.randn(T, D, dtype=dtype)
    w_up, w_down = torch.randn(E, D, G, dtype=dtype), torch.randn(E, G, D, dtype=dtype)
    gates = torch.rand(T, K)
    launches: list[Launch] = []
    product = [""]
    with ExitStack() as stack:
        stack.enter_context(fp32_matmul_precision(precision))
        for name in ("gather_matmul_kernel", "weight_grad_kernel", "sum_spans_kernel"):
            recorder = _Recorder(getattr(triton_ops, name), launches, product)
            stack.enter_context(mock.patch.object(triton_ops, name, recorder))
        gates_sorted = triton_ops.sorted_gates(gates, plan)
        product[0] = "up"
        h = triton_ops.up_forward(x, w_up, plan, expert_order=True)
        product[0] = "down"
        triton_ops.down_forward(h, w_down, plan, gates_sorted, expert_order=True)
        product[0] = "down backward"
        grad_h, _, _ = triton_ops.down_backward(grad_y, h, w_down, plan, gates, gates_sorted, True, True, True, True)
        product[0] = "up backward"
        triton_ops.up_backward(grad_h, x, w_up, plan, True, True, True)
        product[0] = "up dW, split"
        triton_ops.weight_grad(x, grad_h, plan.tokens, plan.sorted_rows(), plan, w_up.shape,
                               span_rows=triton_ops.MIN_SPAN_ROWS)
    for launch in launches:
        launch.product = PRODUCTS[launch.product, _jit_function(launch.kernel).__name__]
    return launches


def _jit_function(kernel):
    """The kernel's JITFunction under its autotune / heuristics wrappers."""
    from triton.runtime.jit import JITFunction

    fn = kernel
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    return fn


def _config_variants(launch: Launch) -> Iterator[tuple[str, dict]]:
    """(config name, keyword arguments with constexprs, heuristics, warps and stages) of each config the
    launch's autotuner may pick (every config of its list), or of the plain launch."""
    from triton.runtime.autotuner import Autotuner, Heuristics

    jit = _jit_function(launch.kernel)
    configs = launch.kernel.configs if isinstance(launch.kernel, Autotuner) else [None]
    heuristics = launch.kernel.fn.values if isinstance(launch.kernel, Autotuner) and isinstance(
        launch.kernel.fn, Heuristics) else {}
    for config in configs:
        kwargs = dict(launch.kwargs)
        warps, stages = 4, 3  # Triton's defaults for a launch without a config
        if config is not None:
            kwargs.update(config.kwargs)
            warps, stages = config.num_warps, config.num_stages
        named = {**dict(zip(jit.arg_names, launch.args, strict=False)), **kwargs}
        kwargs.update({name: rule(named) for name, rule in heuristics.items()})
        yield config_name(kwargs, warps, stages), {**kwargs, "num_warps": warps, "num_stages": stages}


def config_name(kwargs: dict, warps: int, stages: int | None = None) -> str:
    """'M64 N64 K32 w4 s3': a config's block sizes (its BLOCK_* keyword arguments), warps and stages."""
    sizes = " ".join(f"{k.removeprefix('BLOCK_')}{v}" for k, v in kwargs.items() if k.startswith("BLOCK"))
    return f"{sizes} w{warps}" + ("" if stages is None else f" s{stages}")


def compile_for_hopper(jit, args: tuple, kwargs: dict):
    """``jit`` compiled for sm_90a with the specialisation a launch with these arguments gets: Triton's own
    binder for the NVIDIA backend (the steps of ``JITFunction.run`` before compiling)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", HOPPER_CAPABILITY, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constants, attrs = jit._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(jit, signature, constants, attrs), target=target, options=options.__dict__)


def _ptxas_report(ptx: str) -> tuple[int, int]:
    """(registers per thread, spill-store bytes) of ptxas -v on sm_90a."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.ptx"
        path.write_text(ptx)
        report = subprocess.run([get_ptxas(HOPPER_CAPABILITY).path, "-v", "--gpu-name=sm_90a", str(path),
                                 "-o", str(path.with_suffix(".cubin"))], capture_output=True, text=True, check=True)
    registers = int(re.search(r"Used (\d+) registers", report.stderr).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", report.stderr).group(1))
    return registers, spills


_LABEL = re.compile(r"^(\$L__BB\d+_\d+):")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);")
_LD_GLOBAL = re.compile(r"\bld\.global(?:\.[a-z]+\d*)*?(?:\.v(\d))?\.[bufs](\d+)\s")
_CP_ASYNC = re.compile(r"\bcp\.async\.c[ag]\.shared\.global\s*\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-f]+|\d+)")
_WAIT_GROUP = re.compile(r"\bcp\.async\.wait_group\s+(\d+)")


def main_loop(ptx: str) -> list[str]:
    """The lines of the innermost loop that holds the matrix instruction (a backward branch's target to the
    branch), else of the first loop; empty when the kernel has no loop."""
    lines = ptx.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := _LABEL.match(line))}
    loops = [(labels[m.group(1)], i) for i, line in enumerate(lines)
             if (m := _BRANCH.search(line)) and labels.get(m.group(1), i + 1) <= i]
    with_mma = [(a, b) for a, b in loops if any("mma" in line for line in lines[a:b])]
    chosen = min(with_mma or loops, key=lambda ab: ab[1] - ab[0], default=None)
    return lines[chosen[0]:chosen[1] + 1] if chosen else []


def loop_loads(ptx: str) -> LoopLoads:
    """The main loop's global loads per thread and iteration (each instruction counted once, predicated or not)."""
    loads = LoopLoads()
    loop = main_loop(ptx)
    for line in loop:
        if (m := _CP_ASYNC.search(line)) is not None:
            width = int(m.group(1), 0)
            loads.bytes_by_width["cp.async", width] += width
        elif (m := _LD_GLOBAL.search(line)) is not None:
            width = int(m.group(1) or 1) * int(m.group(2)) // 8
            loads.bytes_by_width["ld.global", width] += width
        loads.tma += "cp.async.bulk" in line
    waits = [int(m.group(1)) for line in loop if (m := _WAIT_GROUP.search(line))]
    groups = sum("cp.async.commit_group" in line for line in loop)
    if waits and groups:
        loads.depth = min(waits) // groups + 2  # wait_group N leaves N groups, N / groups iterations, in flight
    return loads


def _tile_bytes(kernel: str, kwargs: dict, dtype: torch.dtype) -> int:
    """Bytes of the main loop's two operand tiles per thread and iteration (0 for the span sums)."""
    blocks = {k: v for k, v in kwargs.items() if k.startswith("BLOCK")}
    if kernel == "gather_matmul_kernel":
        elements = blocks["BLOCK_K"] * (blocks["BLOCK_M"] + blocks["BLOCK_N"])
    elif kernel == "weight_grad_kernel":
        elements = blocks["BLOCK_R"] * (blocks["BLOCK_I"] + blocks["BLOCK_J"])
    else:
        return 0
    return elements * dtype.itemsize // (32 * kwargs["num_warps"])


def resources(dtypes: tuple[str, ...] = tuple(DTYPES), layers: tuple[LayerShape, ...] = (PAPER_LAYER,)
              ) -> Iterator[Resources]:
    """Every config of every launch of a layer's training step, compiled for sm_90a, in each of ``DTYPES``.
    Launches that compile to the same kernel (same signature, constants and attributes) are read once."""
    compiled_once: dict[str, Any] = {}
    for layer in layers:
        for dtype_name in dtypes:
            dtype, precision = DTYPES[dtype_name]
            for launch in layer_launches(layer, dtype, precision):
                jit = _jit_function(launch.kernel)
                for config, kwargs in _config_variants(launch):
                    with warnings.catch_warnings():  # triton 3.9 warns that its fp-fusion default will change
                        warnings.simplefilter("ignore", UserWarning)
                        compiled = compile_for_hopper(jit, launch.args, kwargs)
                    key = compiled.hash
                    if key not in compiled_once:
                        ptx = compiled.asm["ptx"]
                        compiled_once[key] = (loop_loads(ptx), _mma(ptx), *_ptxas_report(ptx), compiled.metadata.shared)
                    loads, mma, registers, spills, shared = compiled_once[key]
                    yield Resources(layer.name, jit.__name__.removesuffix("_kernel"), launch.product, config,
                                    dtype_name, loads, _tile_bytes(jit.__name__, kwargs, dtype), mma, registers,
                                    spills, shared)


def _mma(ptx: str) -> str:
    return "wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else "none"


COLUMNS = ("layer", "kernel", "product", "config", "dtype", "main-loop loads per thread (by width)",
           "tile bytes / thread", "16-byte", "buffers", "mma", "registers", "spill bytes", "shared KB")


def cells(r: Resources) -> tuple[str, ...]:
    vectorised = "—" if not r.tile_bytes else "yes" if r.tiles_vectorised() else "**no**"
    return (r.layer, r.kernel, r.product, r.config, r.dtype, r.loads.describe(), str(r.tile_bytes or "—"),
            vectorised, str(r.loads.depth), r.mma, str(r.registers), str(r.spill_bytes),
            f"{r.shared_bytes / 1024:.0f}")


def markdown(rows: list[Resources]) -> str:
    return "\n".join(markdown_table(COLUMNS, [cells(r) for r in rows])) + "\n"
