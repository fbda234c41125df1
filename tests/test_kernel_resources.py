"""``sffn bench --kernel-resources``: the PTX reading on hand-written PTX, and every launch of a layer's training
step compiled for sm_90a with the real call's specialisation: 16-byte tile loads and no spills in bf16 and fp16,
and a layout whose rows are not 16-byte aligned seen as scalar loads (so the check can fail)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sffn_lab.bench.kernel_resources import HOPPER_SHARED_BYTES, loop_loads, main_loop
from sffn_lab.kernels import triton_available
from tests.support import run_cli

PTX = """
.visible .entry k(
)
{
\tld.global.b64 { %rd1 }, [ %rd2 + 0 ];
\tcp.async.cg.shared.global [ %r1 + 0 ], [ %rd3 + 0 ], 0x10, %r2;
\tcp.async.commit_group;
\tcp.async.cg.shared.global [ %r1 + 0 ], [ %rd3 + 0 ], 0x10, %r2;
\tcp.async.commit_group;
$L__BB0_2:
\tld.global.b64 { %rd9 }, [ %rd8 + 0 ];
\t@%p1 bra \t$L__BB0_2;
$L__BB0_3:                              // =>This Inner Loop Header: Depth=1
\tcp.async.wait_group \t1;
\tld.global.b16 { %rs1 }, [ %rd79 + 0 ];
\t@%p3 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd80 + 0 ];
\twgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%r164}, %rd95, %rd96, %p5, 1, 1, 0, 1;
\tcp.async.cg.shared.global [ %r103 + 0 ], [ %rd131 + 0 ], 0x10, %r104;
\tcp.async.ca.shared.global [ %r105 + 0 ], [ %rd132 + 0 ], 0x8, %r104;
\tcp.async.commit_group;
\t@%p9 bra \t$L__BB0_3;
\tld.global.b16 { %rs9 }, [ %rd1 + 0 ];
\tret;
}
"""


def test_main_loop_is_the_loop_with_the_matrix_instruction():
    loop = main_loop(PTX)
    assert loop[0].startswith("$L__BB0_3:") and "bra" in loop[-1] and any("wgmma" in line for line in loop)
    assert main_loop(PTX.replace("wgmma.mma_async", "fma.rn"))[0].startswith("$L__BB0_2:")  # else the first loop
    assert main_loop("\tret;\n") == []


def test_loop_loads_count_bytes_by_instruction_width_and_the_pipeline_depth():
    loads = loop_loads(PTX)
    assert dict(loads.bytes_by_width) == {("ld.global", 2): 2, ("ld.global", 16): 16, ("cp.async", 16): 16,
                                          ("cp.async", 8): 8}
    assert loads.wide_bytes() == 32 and loads.narrowest() == 2 and loads.tma == 0
    assert loads.depth == 3  # wait_group 1 with one commit group per iteration: three buffers
    assert loop_loads(PTX.replace("cp.async.wait_group \t1", "cp.async.wait_group \t0")).depth == 2


def _without_interpreter() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


@pytest.mark.slow
@pytest.mark.skipif(not triton_available(), reason="no triton")
def test_every_bf16_and_fp16_launch_loads_its_tiles_in_16_bytes_without_spills(tmp_path):
    """``sffn bench --kernel-resources --quick`` (a process without the interpreter): every config of each of the
    layer's launches (both products forward, dh, dx, both weight gradients whole and split, the span sums) in
    bf16 and fp16, compiled for sm_90a as the real call specialises it: every operand tile through 16-byte loads,
    wgmma, no spill, within the shared memory."""
    from sffn_lab.kernels import triton_gather_matmul, triton_weight_grad

    done = subprocess.run([sys.executable, "-m", "sffn_lab", "bench", "--kernel-resources", "--quick", "--out",
                           str(tmp_path)], env=_without_interpreter(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = (tmp_path / "kernel_resources.md").read_text().splitlines()
    header = [c.strip() for c in lines[0].split("|")[1:-1]]
    rows = [dict(zip(header, (c.strip() for c in line.split("|")[1:-1]), strict=True)) for line in lines[2:]]
    per_dtype = 4 * len(triton_gather_matmul.configs(False)) + 3 * len(triton_weight_grad.configs(False)) + 3
    assert len(rows) == 2 * per_dtype
    assert {r["dtype"] for r in rows} == {"bf16", "fp16"}
    assert {r["product"] for r in rows} == {"up forward", "down forward", "down dh", "up dx", "down dW", "up dW",
                                            "up dW, split", "down dW sums", "up dW sums", "up dW sums, split"}
    for r in rows:
        where = f"{r['product']} {r['config']} {r['dtype']}"
        assert r["spill bytes"] == "0", where
        assert float(r["shared KB"]) * 1024 <= HOPPER_SHARED_BYTES, where
        if r["kernel"] != "sum_spans":
            assert r["16-byte"] == "yes" and r["mma"] == "wgmma", f"{where}: {r}"
            assert "2 B" not in r["main-loop loads per thread (by width)"], where


UNALIGNED_CHECK = """
import json, torch
from sffn_lab.bench import kernel_resources as kr
launch = kr.layer_launches(kr.UNALIGNED_LAYER, torch.bfloat16)[0]
config, kwargs = next(kr._config_variants(launch))
ptx = kr.compile_for_hopper(kr._jit_function(launch.kernel), launch.args, kwargs).asm["ptx"]
loads = kr.loop_loads(ptx)
print(json.dumps({"product": launch.product, "wide": loads.wide_bytes(), "narrowest": loads.narrowest(),
                  "tile": kr._tile_bytes("gather_matmul_kernel", kwargs, torch.bfloat16)}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not triton_available(), reason="no triton")
def test_rows_that_are_not_16_byte_aligned_are_seen_as_scalar_loads():
    """D 412 (WikiText-103-small's width): x's rows are 824 bytes apart, so the specialisation cannot mark them
    16-byte aligned and the up product gathers them with 2-byte loads; the check must see that."""
    done = subprocess.run([sys.executable, "-c", UNALIGNED_CHECK], env=_without_interpreter(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.splitlines()[-1])
    assert seen["product"] == "up forward" and seen["narrowest"] == 2 and seen["wide"] < seen["tile"], seen


def test_kernel_resources_refuses_the_interpreter(capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    code, out, err = run_cli(["bench", "--kernel-resources"], capsys)
    assert code == 2 and "without TRITON_INTERPRET=1" in out + err
