"""The operators, backend selection, plan caching, torch.compile and import hygiene."""
import subprocess
import sys

import pytest
import torch
from helpers import make_params, with_grads

import gradstats
from gradstats import native, worklist
from gradstats.backend import Backend, choose_backend


def _sample_tensors(device):
    return [torch.randn(n, device=device) for n in (3, 700, 1)] + [
        torch.randn(40, device=device, dtype=torch.bfloat16)]


def test_opcheck_accumulate_stats(backend_device):
    tensors = _sample_tensors(backend_device)
    for args in [(tensors, 2.0, 64, -40), (tensors, float("inf"), 0, 0), (tensors, 3.5, 50, -10)]:
        torch.library.opcheck(torch.ops.gradstats.accumulate_stats.default, args)


def test_opcheck_finalize(backend_device):
    power = torch.rand(5, dtype=torch.float64, device=backend_device)
    for norm_type in (1.0, 2.0, 3.5, float("inf")):
        torch.library.opcheck(torch.ops.gradstats.finalize.default,
                              (power, norm_type, 1.0, torch.float32))


def test_opcheck_in_place_ops(backend_device):
    coef = torch.tensor(0.5, device=backend_device)
    torch.library.opcheck(torch.ops.gradstats.scale_.default,
                          (_sample_tensors(backend_device), coef))
    torch.library.opcheck(torch.ops.gradstats.clamp_.default,
                          (_sample_tensors(backend_device), -0.5, 0.5))


def test_ops_agree_with_reference_twin(triton_device, monkeypatch):
    tensors = _sample_tensors(triton_device)
    tensors[1][5] = float("nan")
    fused = torch.ops.gradstats.accumulate_stats(tensors, 2.0, 64, -40)
    monkeypatch.setenv("GRADSTATS_BACKEND", "torch")
    twin = torch.ops.gradstats.accumulate_stats(tensors, 2.0, 64, -40)
    torch.testing.assert_close(fused[0], twin[0], rtol=1e-6, atol=0, equal_nan=True)
    assert torch.equal(fused[1], twin[1]) and torch.equal(fused[2], twin[2])


def test_compiled_clip_matches_eager(backend_device):
    params = make_params([30, 7, 1], torch.float32, backend_device, scale=3.0)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for twin, param in zip(twins, params):
        twin.grad = param.grad.clone()

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(ps):
        return gradstats.fused_clip_grad_norm_(ps, 1.0)

    total = step(params)
    expected = torch.nn.utils.clip_grad_norm_(twins, 1.0)
    torch.testing.assert_close(total, expected)
    for param, twin in zip(params, twins):
        torch.testing.assert_close(param.grad, twin.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compiled_clip_value_and_total_norm_match_eager(backend_device, dtype):
    params = make_params([30, 7, 1], dtype, backend_device, scale=3.0)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for twin, param in zip(twins, params):
        twin.grad = param.grad.clone()

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(ps):
        gradstats.clip_grad_value_(ps, 0.5)
        return gradstats.get_total_norm([p.grad for p in ps])

    total = step(params)
    torch.nn.utils.clip_grad_value_(twins, 0.5)
    expected = torch.nn.utils.get_total_norm([t.grad for t in twins])
    torch.testing.assert_close(total, expected)
    for param, twin in zip(params, twins):
        assert torch.equal(param.grad, twin.grad)  # clamping is exact


@pytest.mark.skipif(not native.available(), reason="the native CPU layer is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inductor_compiled_clip_on_native_matches_torch(dtype, monkeypatch):
    monkeypatch.setenv("GRADSTATS_BACKEND", "native")
    params = make_params([300, 70, 1], dtype, "cpu", scale=3.0)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for twin, param in zip(twins, params):
        twin.grad = param.grad.clone()

    @torch.compile(fullgraph=True)  # inductor
    def step(ps):
        total = gradstats.fused_clip_grad_norm_(ps, 1.0)
        gradstats.clip_grad_value_(ps, 0.01)
        return total

    total = step(params)
    expected = torch.nn.utils.clip_grad_norm_(twins, 1.0)
    torch.nn.utils.clip_grad_value_(twins, 0.01)
    torch.testing.assert_close(total, expected)
    for param, twin in zip(params, twins):
        torch.testing.assert_close(param.grad, twin.grad)


@pytest.mark.parametrize("p", [3.0, 0.5, 2.0, 1.0, float("inf")])
def test_fp64_groups_between_others_line_up_with_their_scratch(triton_device, p):
    """Under a general p, float64 groups are read by the reference and get no scratch
    buffers; the launched groups around them must still read and write their own."""
    torch.manual_seed(0)
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float64, torch.float16,
              torch.float32]
    grads = [torch.randn(37 + 11 * i, dtype=dtype, device=triton_device)
             for i, dtype in enumerate(dtypes)]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for param, grad in zip(params, grads):
        param.grad = grad
    stats = gradstats.grad_stats(params, norm_type=p, histogram=False)
    expected = [torch.linalg.vector_norm(g.double().cpu(), p) for g in grads]
    torch.testing.assert_close(stats.norms.double().cpu(), torch.stack(expected),
                               rtol=1e-5, atol=0)
    total = torch.linalg.vector_norm(torch.cat([g.double().cpu() for g in grads]), p)
    torch.testing.assert_close(gradstats.get_total_norm(grads, p).double().cpu(), total,
                               rtol=1e-5, atol=0)


def test_plan_is_cached_and_rebuilt_when_grads_move(triton_device):
    worklist.clear_plan_cache()
    params = make_params([10, 20], torch.float32, triton_device)
    gradstats.get_total_norm([p.grad for p in params])
    gradstats.get_total_norm([p.grad for p in params])
    assert len(worklist._plans) == 1
    params[0].grad = torch.full((10,), 2.0, device=triton_device)  # new storage
    expected = torch.nn.utils.get_total_norm([p.grad for p in params])
    torch.testing.assert_close(gradstats.get_total_norm([p.grad for p in params]), expected)
    assert len(worklist._plans) == 2


def test_plan_cache_is_bounded(triton_device):
    worklist.clear_plan_cache()
    for _ in range(worklist.PLAN_CACHE_SIZE + 5):
        gradstats.get_total_norm([torch.randn(3, device=triton_device)])
    assert len(worklist._plans) <= worklist.PLAN_CACHE_SIZE


def test_backend_choice(monkeypatch):
    monkeypatch.setenv("GRADSTATS_BACKEND", "torch")
    assert choose_backend(torch.device("cpu")) is Backend.TORCH
    monkeypatch.setenv("GRADSTATS_BACKEND", "auto")
    cpu_backend = Backend.NATIVE if native.available() else Backend.TORCH
    assert choose_backend(torch.device("cpu")) is cpu_backend
    monkeypatch.setenv("GRADSTATS_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="GRADSTATS_BACKEND"):
        choose_backend(torch.device("cpu"))


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("GRADSTATS_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        gradstats.grad_stats(with_grads([torch.ones(3)]))


def test_sparse_grads_take_the_reference_path(backend_device):
    dense = torch.zeros(6, 5, device=backend_device)
    dense[1, 2], dense[4, 0] = 3.0, -4.0
    stats = gradstats.grad_stats(with_grads([dense.to_sparse()]))
    assert stats.norms.item() == pytest.approx(5.0)
    assert stats.hist[0, 0].item() == 28 and stats.hist.sum().item() == 30


def test_import_is_lean():
    code = ("import sys, torch, gradstats; "
            "assert 'triton' not in sys.modules, 'triton imported'; "
            "assert not torch.cuda.is_initialized(), 'CUDA initialised'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_plan_cache_tells_a_gapped_view_from_a_dense_one(triton_device):
    base = torch.arange(1.0, 65.0, device=triton_device)
    dense = base[:32].view(4, 8).t()  # same address, size and dtype as the next one
    gapped = base.view(8, 8)[:, :4]
    for view in (dense, gapped):
        torch.testing.assert_close(gradstats.get_total_norm([view]),
                                   torch.nn.utils.get_total_norm([view]))
    untouched = base.view(8, 8)[:, 4:].clone()
    gradstats.clip_grad_value_(with_grads([gapped]), 3.0)
    assert torch.equal(base.view(8, 8)[:, 4:], untouched)


def test_no_half_update_when_a_later_device_cannot_be_served(monkeypatch):
    monkeypatch.setenv("GRADSTATS_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cpu = torch.tensor([5.0, -5.0, 1.0])
    meta = torch.empty(3, device="meta")
    with pytest.raises(RuntimeError, match="meta"):
        gradstats.clip_grad_value_(with_grads([cpu, meta]), 1.0)
    assert cpu.tolist() == [5.0, -5.0, 1.0]
