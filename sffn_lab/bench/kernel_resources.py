"""``sffn bench --kernel-resources``: every autotuned config of the Triton kernels compiled for a Hopper GPU
(sm_90a) on this machine, no GPU needed, with what ptxas reports per program: registers per thread, bytes
spilled to local memory, and shared memory.

These are static facts about the generated code, not timings: a config that spills, or needs more shared
memory than the GPU has, is slow or does not launch whatever the autotuner measures. Triton's compiler and
ptxas both ship in the triton wheel. A process that runs the kernels under the interpreter cannot compile
them (``TRITON_INTERPRET=1`` decorates them for the interpreter).
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sffn_lab.markdown import markdown_table

HOPPER_CAPABILITY = 90
HOPPER_SHARED_BYTES = 232_448  # the most shared memory one H100 / H200 program may use (227 KB)
DTYPES = ("bf16", "fp16", "fp32")


@dataclass
class Resources:
    kernel: str
    config: str
    dtype: str
    registers: int
    spill_bytes: int
    shared_bytes: int

    def fits(self) -> bool:
        return self.shared_bytes <= HOPPER_SHARED_BYTES


def _jit_function(kernel):
    """The kernel's JITFunction under its autotune / heuristics wrappers."""
    from triton.runtime.jit import JITFunction

    fn = kernel
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    return fn


def compile_for_hopper(kernel, pointers: dict[str, str], constants: dict, num_warps: int, num_stages: int
                       ) -> tuple[int, int, int]:
    """(registers per thread, spill-store bytes, shared-memory bytes) of ``kernel`` compiled for sm_90a with
    the given pointer element types (by argument name; other runtime arguments are i32) and constexprs."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    jit = _jit_function(kernel)
    signature = {name: "constexpr" if name in constants else pointers.get(name, "i32") for name in jit.arg_names}
    compiled = triton.compile(ASTSource(jit, signature, constants),
                              target=GPUTarget("cuda", HOPPER_CAPABILITY, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": True})
    with tempfile.TemporaryDirectory() as folder:
        ptx = Path(folder) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        report = subprocess.run([get_ptxas(HOPPER_CAPABILITY).path, "-v", "--gpu-name=sm_90a", str(ptx),
                                 "-o", str(ptx.with_suffix(".cubin"))], capture_output=True, text=True, check=True)
    registers = int(re.search(r"Used (\d+) registers", report.stderr).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", report.stderr).group(1))
    return registers, spills, compiled.metadata.shared


def _config_name(config) -> str:
    sizes = " ".join(f"{k.removeprefix('BLOCK_')}{v}" for k, v in config.kwargs.items() if k.startswith("BLOCK_"))
    return f"{sizes} w{config.num_warps} s{config.num_stages}"


def resources(dtypes: tuple[str, ...] = DTYPES) -> Iterator[Resources]:
    """Every GPU config of the gathered matmul (scaled, K a multiple of BLOCK_K: the common case) and of the
    weight gradient (scaled, one span per expert), in each dtype; fp32 with TF32 products."""
    from sffn_lab.kernels import triton_gather_matmul, triton_weight_grad

    for dtype in dtypes:
        data = f"*{dtype}"
        gather = {"a_ptr": data, "w_ptr": data, "out_ptr": data, "src_ptr": "*i64", "dst_ptr": "*i64",
                  "scale_ptr": "*fp32", "small_tiles_ptr": "*i64", "large_tiles_ptr": "*i64"}
        for config in triton_gather_matmul.configs(interpreted=False):
            constants = {"HAS_SCALE": True, "IEEE": False, "UPCAST": False, "EVEN_K": True,
                         "LARGE_M": triton_gather_matmul.GPU_TILE_HEIGHTS[1], **config.kwargs}
            yield Resources("gather_matmul", _config_name(config), dtype, *compile_for_hopper(
                triton_gather_matmul.gather_matmul_kernel, gather, constants, config.num_warps, config.num_stages))
        grad = {"a_ptr": data, "b_ptr": data, "out_ptr": data, "src_a_ptr": "*i64", "src_b_ptr": "*i64",
                "scale_ptr": "*fp32", "spans_ptr": "*i64"}
        for config in triton_weight_grad.configs(interpreted=False):
            constants = {"HAS_SCALE": True, "IEEE": False, "UPCAST": False, **config.kwargs}
            yield Resources("weight_grad", _config_name(config), dtype, *compile_for_hopper(
                triton_weight_grad.weight_grad_kernel, grad, constants, config.num_warps, config.num_stages))


def markdown(rows: list[Resources]) -> str:
    cells = [(r.kernel, r.config, r.dtype, str(r.registers), str(r.spill_bytes), f"{r.shared_bytes / 1024:.0f}")
             for r in rows]
    columns = ("kernel", "config", "dtype", "registers / thread", "spill stores (bytes)", "shared memory (KB)")
    return "\n".join(markdown_table(columns, cells)) + "\n"
