"""The expert matmuls (Triton, under TRITON_INTERPRET=1 without a GPU, and the PyTorch path) vs float64.

Tensors live on CUDA when there is one and on the CPU otherwise. Each case draws fresh random
inputs from the ``seed`` fixture (printed on failure; ``pytest --seed N`` replays it).
"""

from __future__ import annotations

import pytest
import torch

from sffn_lab.bench.accuracy import TOLERANCE, compare_with_float64, relative_error, skewed_routing
from sffn_lab.kernels import (
    RoutingPlan,
    expert_down,
    expert_up,
    pick_backend,
    torch_grouped,
    triton_available,
)
from sffn_lab.kernels.backends import get_backend
from sffn_lab.kernels.torch_grouped import STRATEGIES

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not triton_available(), reason="no triton"))]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def run(backend, dtype, device, T, K, E, D, G, gated=True, empty=(1,), strategy=None,
        expert_order=False) -> dict[str, torch.Tensor]:
    """Forward and every gradient against float64 within TOLERANCE[dtype]; returns the outputs by name."""
    result = compare_with_float64(backend, dtype, device, T, K, E, D, G, gated, empty, strategy, expert_order)
    for name, value in result.outputs.items():
        expected_dtype = torch.float32 if name == "dgates" else dtype
        assert value.dtype == expected_dtype and value.device.type == device.type, f"{name}: {value.dtype}"
    assert result.worst() < TOLERANCE[dtype], (
        f"{backend} {dtype}: errors relative to max(|float64|, 1): {result.errors}"
    )
    return result.outputs


ORDERS = [pytest.param(False, id="h_per_pair"), pytest.param(True, id="h_in_expert_order")]


@pytest.mark.parametrize("expert_order", ORDERS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T, K, E, D, G",
                         [(37, 2, 5, 20, 24), (50, 1, 3, 33, 17), (16, 3, 4, 40, 8), (30, 2, 4, 64, 32)])
def test_matches_float64_reference(backend, dtype, T, K, E, D, G, expert_order, device, seed, fp32_ieee):
    run(backend, dtype, device, T, K, E, D, G, expert_order=expert_order)


@pytest.mark.parametrize("expert_order", ORDERS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_without_gates_and_with_several_empty_experts(backend, dtype, expert_order, device, seed, fp32_ieee):
    got = run(backend, dtype, device, T=29, K=2, E=7, D=18, G=20, gated=False, empty=(0, 3, 6),
              expert_order=expert_order)
    for dw in (got["dkeys"], got["dvalues"]):  # experts no token used get exactly zero weight gradients
        assert dw[[0, 3, 6]].abs().sum() == 0


@pytest.mark.parametrize("block_rows", [1, 9, 10**9])
def test_torch_path_blocks_of_one_several_or_all_experts(block_rows, device, seed, fp32_ieee, monkeypatch):
    """per_expert's gather / scatter blocks: one expert each, a few consecutive experts (empty ones among
    them), or all of them in one block."""
    monkeypatch.setattr(torch_grouped, "BLOCK_ROWS", block_rows)
    plan = RoutingPlan.of(skewed_routing(37, 2, 7, device, empty=(1, 3)), 7)
    blocks = torch_grouped.blocks(plan, "per_expert")
    assert torch.cat([b.pairs for b in blocks]).equal(plan.pairs)  # every pair once, in order
    used = [e for e in range(7) if plan.counts[e] > 0]  # never 1 or 3
    assert [e for b in blocks for e, _ in b.experts(plan)] == used
    for b in blocks[:-1]:  # each block closes at the first expert that brings it to BLOCK_ROWS rows
        assert sum(b.counts) >= block_rows > sum(b.counts) - b.counts[-1]
    assert len(blocks) == len(used) or block_rows != 1  # one block per expert with rows
    assert len(blocks) == 1 or block_rows != 10**9
    for expert_order in (False, True):
        run("torch", torch.float32, device, T=37, K=2, E=7, D=20, G=24, empty=(1, 3), strategy="per_expert",
            expert_order=expert_order)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("grouped_mm", [True, False])
def test_torch_path_strategies_with_and_without_grouped_mm(strategy, grouped_mm, device, seed, fp32_ieee, monkeypatch):
    if grouped_mm:
        probe = torch.empty(8, 20, device=device), torch.empty(3, 20, 24, device=device)
        if not torch_grouped.use_grouped_mm(*probe, groups=3):
            pytest.skip(f"torch._grouped_mm does not take fp32 {device.type} tensors in this torch")
    else:
        monkeypatch.setattr(torch_grouped, "use_grouped_mm", lambda *tensors, groups: False)
    for expert_order in (False, True):
        run("torch", torch.float32, device, T=37, K=2, E=5, D=20, G=24, empty=(1, 3), strategy=strategy,
            expert_order=expert_order)


@pytest.mark.parametrize("capability, version, dtype, groups, expected", [
    ((9, 0), "2.13.0", torch.bfloat16, 16, True),  # Hopper: the CUTLASS kernel
    ((10, 0), "2.13.0", torch.bfloat16, 16, True),  # Blackwell (sm_100) from torch 2.9
    ((8, 0), "2.13.0", torch.bfloat16, 16, False),  # A100: torch's fallback loops over offs.cpu()
    ((12, 0), "2.13.0", torch.bfloat16, 16, False),  # consumer Blackwell: the fallback too
    ((9, 0), "2.13.0", torch.float16, 16, False),  # only bf16 reaches the CUTLASS kernel
    ((9, 0), "2.13.0", torch.bfloat16, 1023, True),
    ((9, 0), "2.13.0", torch.bfloat16, 1024, False),  # "Can't process more than 1024 groups"
    ((9, 0), "2.8.0", torch.bfloat16, 16, True),
    ((10, 0), "2.8.0", torch.bfloat16, 16, False),  # torch 2.8 raises off compute capability 9.x
    ((8, 0), "2.8.0", torch.bfloat16, 16, False),
    ((9, 0), "2.7.1", torch.bfloat16, 16, False),  # no torch._grouped_mm before 2.8
])
def test_grouped_mm_only_where_one_cuda_kernel_computes_it(capability, version, dtype, groups, expected, monkeypatch):
    """The decision for a CUDA tensor, with the device capability and the torch version patched: asked of the
    tensor's own device."""
    asked = []
    monkeypatch.setattr(torch, "__version__", version)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or capability)
    device = torch.device("cuda", 1)
    assert torch_grouped.grouped_mm_computes(device, dtype, groups) is expected
    assert asked in ([device], [])  # torch 2.7 is refused before the device is asked


@pytest.mark.parametrize("version, expected", [("2.8.0", False), ("2.9.1", True), ("2.13.0+cpu", True)])
def test_grouped_mm_on_the_cpu_from_torch_2_9(version, expected, monkeypatch):
    monkeypatch.setattr(torch, "__version__", version)
    assert torch_grouped.grouped_mm_computes(torch.device("cpu"), torch.float32, 4096) is expected


LAYOUTS = {
    "contiguous": lambda: torch.randn(4, 16, 8),
    "transposed matrices": lambda: torch.randn(4, 8, 16).transpose(1, 2),
    "expanded columns": lambda: torch.randn(4, 16, 1).expand(4, 16, 8),
    "expanded rows": lambda: torch.randn(4, 1, 8).expand(4, 16, 8),
    "expanded groups": lambda: torch.randn(1, 16, 8).expand(4, 16, 8),  # one matrix for every group: taken
    "rows not on 16 bytes": lambda: torch.randn(4, 16, 7),
    "2-D, expanded rows": lambda: torch.randn(1, 16).expand(8, 16),
    "2-D, transposed": lambda: torch.randn(16, 8).t(),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_grouped_mm_layout_check_agrees_with_torch(layout):
    """``_aligned`` takes exactly the layouts ``torch._grouped_mm`` takes (stride-0 matrix dimensions refused),
    checked against the op itself on this machine's torch."""
    t = LAYOUTS[layout]()
    if not torch_grouped.grouped_mm_computes(t.device, t.dtype, 4):
        pytest.skip("torch._grouped_mm has no CPU kernel in this torch")
    other = torch.randn(4, t.shape[-1], 8) if t.dim() == 2 else torch.randn(8, t.shape[1])
    a, b = (t, other) if t.dim() == 2 else (other, t)
    offs = torch.tensor([2, 4, 6, a.shape[0]], dtype=torch.int32) if b.dim() == 3 else None
    try:
        torch._grouped_mm(a, b, offs=offs)
        taken = True
    except RuntimeError:
        taken = False
    assert torch_grouped._aligned(t) is taken


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_computes_in_its_dtype_and_gives_fp32_parameters_fp32_gradients(backend, device, seed):
    """Under autocast the products take the autocast dtype as a matmul would; the gradients of fp32 leaves
    are fp32 and match float64 within the bf16 tolerance."""
    T, K, E, D, G = 33, 2, 4, 24, 16
    leaves = [torch.randn(T, D, device=device), torch.randn(E, D, G, device=device) * D**-0.5,
              torch.randn(E, G, D, device=device) * G**-0.5, torch.rand(T, K, device=device)]
    plan = RoutingPlan.of(skewed_routing(T, K, E, device), E)

    def forward_backward(tensors, backend, autocast):
        tensors = [t.detach().clone().requires_grad_(True) for t in tensors]
        x, w1, w2, g = tensors
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            y = expert_down(torch.relu(expert_up(x, w1, plan, backend)), w2, plan, g, backend)
        y.float().square().sum().backward()
        return y.detach(), [t.grad for t in tensors]

    y, grads = forward_backward(leaves, backend, autocast=True)
    # the reference gets x and the weights as autocast rounds them (bf16), the gates exact (they stay fp32)
    rounded = [t.bfloat16().double() for t in leaves[:3]] + [leaves[3].double()]
    y_ref, grads_ref = forward_backward(rounded, "reference", autocast=False)
    assert y.dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for g in grads)
    errors = [relative_error(a, b) for a, b in zip([y, *grads], [y_ref, *grads_ref], strict=True)]
    assert max(errors) < TOLERANCE[torch.bfloat16], f"errors of y, dx, dw1, dw2, dgates: {errors}"


EMPTY_BATCH_PATHS = [
    pytest.param("torch", "per_expert", id="torch-per_expert"),
    pytest.param("torch", "grouped", id="torch-grouped"),
    pytest.param("triton", None, id="triton", marks=pytest.mark.skipif(not triton_available(), reason="no triton")),
    pytest.param("reference", None, id="reference"),
]


@pytest.mark.parametrize("expert_order", ORDERS)
@pytest.mark.parametrize("backend, strategy", EMPTY_BATCH_PATHS)
def test_an_empty_batch_goes_through_every_backend_forward_and_backward(backend, strategy, expert_order, device,
                                                                       monkeypatch):
    """T = 0 (no token routed): h [0, K, G] (or [0, G]), y [0, D]; every weight gradient exactly zero."""
    T, K, E, D, G = 0, 2, 4, 16, 8
    if strategy is not None:
        monkeypatch.setattr(torch_grouped, "pick_strategy", lambda t, s: strategy)
    x = torch.randn(T, D, device=device, requires_grad=True)
    w1 = torch.randn(E, D, G, device=device, requires_grad=True)
    w2 = torch.randn(E, G, D, device=device, requires_grad=True)
    gates = torch.rand(T, K, device=device, requires_grad=True)
    plan = RoutingPlan.of(torch.empty(T, K, dtype=torch.long, device=device), E)
    h = expert_up(x, w1, plan, backend, expert_order=expert_order)
    assert h.shape == ((T * K, G) if expert_order else (T, K, G))
    y = expert_down(torch.relu(h), w2, plan, gates, backend, expert_order=expert_order)
    assert y.shape == (T, D)
    (y.sum() + w1.sum() * 0).backward()  # w1 in the graph even where the products leave it out
    assert x.grad.shape == (T, D) and gates.grad.shape == (T, K)
    assert w1.grad.abs().sum() == 0 and w2.grad.abs().sum() == 0


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not triton_available(), reason="no triton"))])
def test_an_empty_batch_goes_through_the_custom_ops(backend, device):
    """The ``torch.compile`` form (``custom_ops``), called eagerly with T = 0, forward and both backward ops."""
    from sffn_lab.kernels import custom_ops

    T, K, E, D, G = 0, 2, 4, 16, 8
    x, w1 = torch.randn(T, D, device=device), torch.randn(E, D, G, device=device)
    w2 = torch.randn(E, G, D, device=device)
    gates = torch.rand(T, K, device=device)
    plan = RoutingPlan.of(torch.empty(T, K, dtype=torch.long, device=device), E)
    tensors = plan.tensors(get_backend(backend).reads(x, E))
    for expert_order in (False, True):
        h = custom_ops.expert_up_op(x, w1, tensors, backend, expert_order)
        y = custom_ops.expert_down_op(h, w2, tensors, gates, backend, expert_order)
        assert y.shape == (T, D)
        grad_x, grad_w1 = custom_ops.expert_up_backward_op(h, x, w1, tensors, backend, expert_order, True, True)
        grads = custom_ops.expert_down_backward_op(y, h, w2, tensors, gates, backend, expert_order, True, True, True)
        assert grad_x.shape == x.shape and grad_w1.abs().sum() == 0
        assert grads[0].shape == h.shape and grads[1].abs().sum() == 0 and grads[2].shape == gates.shape


def test_routing_plan_tiles_cover_every_pair_once_within_one_expert(device, seed):
    T, K, E = 45, 3, 6
    plan = RoutingPlan.of(skewed_routing(T, K, E, device, empty=(2,)), E)
    for height in (8, T * K):  # short tiles, and one tile per expert with rows
        tiles = plan.tiles(height)
        assert len(tiles) == -(-T * K // height) + E  # fixed by the shapes: no host sync
        covered = torch.zeros(T * K, dtype=torch.long)
        for i, (e, start, end) in enumerate(zip(*tiles.table.tolist(), strict=True)):
            if start < end:
                assert plan.offsets[e] <= start and end == plan.offsets[e + 1]  # never straddles two experts
                assert tiles.first[e] <= i < tiles.first[e + 1]  # an expert's tiles are consecutive
                covered[start : min(start + tiles.height, end)] += 1
        assert covered.eq(1).all()
        per_expert = tiles.first.diff()
        assert per_expert.sum() <= len(tiles) and per_expert[2] == 0  # expert 2: no rows
    assert plan.indices.reshape(-1)[plan.pairs].diff().ge(0).all()  # pairs in expert order


def test_routing_plan_tensors_live_on_the_routing_device(device, seed):
    plan = RoutingPlan.of(skewed_routing(20, 2, 4, device), 4)
    tiles = plan.tiles(16)
    for t in (plan.pairs, plan.tokens, plan.counts, plan.offsets, plan.group_ends(), tiles.table, tiles.first):
        assert t.device == device


def test_auto_backend_picks_only_what_can_run_the_input():
    cpu = torch.empty(2, 2)
    assert pick_backend(cpu, None) == "torch"
    assert pick_backend(cpu.double(), None) == "torch"
    assert pick_backend(cpu, "triton") == "triton"  # forced: the interpreter runs it on the CPU
    if torch.cuda.is_available():
        assert pick_backend(cpu.cuda().double(), None) == "torch"  # the kernels take fp32 / fp16 / bf16 only
        assert pick_backend(cpu.cuda(), None) == ("triton" if triton_available() else "torch")
    with pytest.raises(ValueError, match="unknown expert-matmul backend"):
        pick_backend(cpu, "cutlass")


def test_backends_agree_with_each_other(device, seed, fp32_ieee):
    """Every backend gives the same h per pair, and in expert order the same rows permuted by the plan; the
    down product reads either layout to the same y."""
    x, w = torch.randn(40, 16, device=device), torch.randn(6, 16, 12, device=device)
    w_down, gates = torch.randn(6, 12, 16, device=device), torch.rand(40, 2, device=device)
    plan = RoutingPlan.of(skewed_routing(40, 2, 6, device), 6)
    backends = ["torch", "reference"] + (["triton"] if triton_available() else [])
    expected = expert_up(x, w, plan, backend="reference")
    expected_y = expert_down(expected, w_down, plan, gates, backend="reference")
    for b in backends:
        per_pair = expert_up(x, w, plan, backend=b)
        in_order = expert_up(x, w, plan, backend=b, expert_order=True)
        torch.testing.assert_close(per_pair, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(in_order, expected.reshape(-1, 12)[plan.pairs], atol=1e-5, rtol=1e-5)
        y = expert_down(in_order, w_down, plan, gates, backend=b, expert_order=True)
        torch.testing.assert_close(y, expected_y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_strided_weight_view_gives_the_contiguous_weights_results(backend, device, seed, fp32_ieee):
    """sMLP's routed token mixing passes a transposed slice of its mixing matrices as the weight [E, D, G]."""
    full = torch.randn(4, 20, 16, device=device, requires_grad=True)
    contiguous = full.detach()[:, 5:].transpose(1, 2).contiguous().requires_grad_(True)  # [4, 16, 15]
    x1 = torch.randn(30, 16, device=device, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    plan = RoutingPlan.of(skewed_routing(30, 1, 4, device), 4)
    y1 = expert_up(x1, full[:, 5:].transpose(1, 2), plan, backend=backend)  # a strided view
    y2 = expert_up(x2, contiguous, plan, backend="reference")
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(y1)
    y1.backward(grad)
    y2.backward(grad)
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full.grad[:, 5:].transpose(1, 2), contiguous.grad, atol=1e-5, rtol=1e-5)
    assert full.grad[:, :5].abs().sum() == 0  # rows outside the slice get no gradient


def _gpu_config_pairs():
    """Every GPU config of both kernels, paired (the shorter list cycles), each with a dtype."""
    from sffn_lab.kernels import triton_gather_matmul, triton_weight_grad

    gather, grads = triton_gather_matmul.configs(interpreted=False), triton_weight_grad.configs(interpreted=False)
    n = max(len(gather), len(grads))
    pairs = [(gather[i % len(gather)], grads[i % len(grads)], DTYPES[i % len(DTYPES)]) for i in range(n)]
    return [pytest.param(*pair, id="m{BLOCK_M}n{BLOCK_N}k{BLOCK_K}".format(**pair[0].kwargs)
                         + "-i{BLOCK_I}j{BLOCK_J}r{BLOCK_R}-".format(**pair[1].kwargs) + str(pair[2])[6:])
            for pair in pairs]


@pytest.mark.skipif(not triton_available(), reason="no triton")
@pytest.mark.parametrize("gather_config, grad_config, dtype", _gpu_config_pairs())
def test_every_gpu_config_matches_float64(gather_config, grad_config, dtype, device, seed, fp32_ieee, monkeypatch):
    """Each autotuned config of the GPU (both tile heights, the grouped launch order) against float64, run
    alone; under the interpreter too. Experts of ~300 rows: several tiles each, the last one partial; widths
    off and on the BLOCK_K multiples (the masked and the unmasked reduction loop)."""
    from sffn_lab.kernels import triton_gather_matmul, triton_ops, triton_weight_grad

    monkeypatch.setattr(triton_ops, "TILE_HEIGHTS", triton_gather_matmul.GPU_TILE_HEIGHTS)
    monkeypatch.setattr(triton_gather_matmul.gather_matmul_kernel, "configs", [gather_config])
    monkeypatch.setattr(triton_weight_grad.weight_grad_kernel, "configs", [grad_config])
    for expert_order in (False, True):
        run("triton", dtype, device, T=300, K=2, E=3, D=70, G=40, expert_order=expert_order)
    run("triton", dtype, device, T=150, K=2, E=3, D=128, G=64, expert_order=True)  # K a multiple of BLOCK_K


@pytest.mark.skipif(not triton_available(), reason="no triton")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_split_weight_gradient_matches_one_span_per_expert_and_float64(dtype, device, seed, fp32_ieee, monkeypatch):
    """Spans of 1, 7 and 16 rows on skewed routing (span edges inside BLOCK_R steps, spans of one row; experts of
    one span written directly and experts of several summed) give the one-span sums up to fp32 reassociation,
    zeros for an unused expert; and the products' backward with short spans forced matches float64."""
    from sffn_lab.kernels import triton_ops

    T, K, E, d_in, J = 40, 2, 5, 24, 36
    plan = RoutingPlan.of(skewed_routing(T, K, E, device, empty=(3,)), E)
    a, b = torch.randn(T, d_in, device=device).to(dtype), torch.randn(T * K, J, device=device).to(dtype)
    scale = torch.rand(T * K, device=device)
    expected = torch.zeros(E, d_in, J, dtype=torch.float64, device=device)
    expected.index_add_(0, plan.indices.reshape(-1)[plan.pairs],
                        a.double()[plan.tokens, :, None] * (scale[:, None] * b.double()[plan.pairs])[:, None, :])
    one_span = triton_ops.weight_grad(a, b, plan.tokens, plan.pairs, plan, (E, d_in, J), scale=scale)
    assert plan.tiles(T * K).first.diff().le(1).all()  # the default off CUDA: one span per expert
    for rows in (1, 7, 16):
        spans_per_expert = plan.tiles(rows).first.diff()
        if rows == 16:
            assert spans_per_expert.eq(1).any() and spans_per_expert.gt(1).any(), spans_per_expert  # both stores
        split = triton_ops.weight_grad(a, b, plan.tokens, plan.pairs, plan, (E, d_in, J), scale=scale, span_rows=rows)
        assert split.dtype == dtype and split[3].abs().sum() == 0
        assert relative_error(split, expected) < TOLERANCE[dtype]
        torch.testing.assert_close(split.float(), one_span.float(), rtol=1e-5 if dtype == torch.float32 else 1e-2,
                                   atol=1e-5 if dtype == torch.float32 else 1e-2)
    monkeypatch.setattr(triton_ops, "rows_per_span", lambda *shape: 5)
    run("triton", dtype, device, T=37, K=2, E=4, D=20, G=24, expert_order=True)


def test_weight_gradient_spans_bound_the_busiest_program(monkeypatch):
    """Four programs per multiprocessor wanted (132 here, an H100's count): 16 experts of D 1024 × G 128 give
    128 programs, so their 16384 rows each are cut into 4096-row spans (640 programs); 128 experts fill the GPU
    alone and keep spans of 4× their mean rows; short experts are never cut below MIN_SPAN_ROWS. On skewed
    routing, an expert 16× busier than the mean is cut into 4 spans while the others keep one each."""
    from sffn_lab.kernels import triton_ops

    monkeypatch.setattr(triton_ops, "_multiprocessors", lambda index: 132)
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert triton_ops.rows_per_span(262144, 16, 1024, 128, gpu) == 4096
    assert triton_ops.rows_per_span(262144, 16, 128, 1024, gpu) == 4096
    assert triton_ops.rows_per_span(262144, 128, 1024, 128, gpu) == 4 * 2048
    assert triton_ops.rows_per_span(2048, 16, 1024, 128, gpu) == triton_ops.MIN_SPAN_ROWS
    assert triton_ops.rows_per_span(262144, 16, 1024, 128, cpu) == 262144  # the interpreter runs programs in turn
    E, busy = 64, 8192
    indices = torch.cat([torch.zeros(busy, dtype=torch.long), torch.arange(busy * 3) % (E - 1) + 1])[:, None]
    rows = triton_ops.rows_per_span(indices.shape[0], E, 1024, 256, gpu)
    assert rows == 4 * 512  # 4× the mean of 512 rows per expert
    spans = RoutingPlan.of(indices, E).tiles(rows).first.diff()
    assert spans[0] == busy // rows and spans[1:].eq(1).all()


@pytest.mark.skipif(not triton_available(), reason="no triton")
def test_config_pruning_keeps_blocks_the_shape_can_fill():
    from sffn_lab.kernels import triton_gather_matmul, triton_weight_grad

    gather = triton_gather_matmul.configs(interpreted=False)
    kept = triton_gather_matmul.prune(gather, {"N": 128, "K": 1024, "rows_hint": 64})
    assert kept and all(c.kwargs["BLOCK_N"] <= 128 and c.kwargs["BLOCK_M"] == 64 for c in kept)
    many_rows = triton_gather_matmul.prune(gather, {"N": 1024, "K": 128, "rows_hint": 16384})
    assert {c.kwargs["BLOCK_M"] for c in many_rows} == {64, 128} and len(many_rows) == len(gather)
    assert triton_gather_matmul.prune(gather, {"N": 8, "K": 8, "rows_hint": 1})  # never empty
    grads = triton_weight_grad.configs(interpreted=False)
    kept = triton_weight_grad.prune(grads, {"d_in": 64, "J": 1024, "rows_hint": 16})
    assert kept and all(c.kwargs["BLOCK_I"] == 64 and c.kwargs["BLOCK_R"] == 32 for c in kept)
