"""Test set-up: which (backend, device) pairs the kernels are exercised on.

Without CUDA the Triton kernels run on CPU tensors in the Triton interpreter, which must
be switched on before triton is first imported: that happens here, before any test module
imports gradstats' kernels.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from gradstats import known_tensors, native, worklist  # noqa: E402
from gradstats import launch_config as config  # noqa: E402
from gradstats.backend import interpreter_enabled, triton_importable  # noqa: E402


def _backend_devices():
    pairs = [pytest.param(("torch", "cpu"), id="torch-cpu")]
    if native.available():
        pairs.append(pytest.param(("native", "cpu"), id="native-cpu"))
    if triton_importable() and interpreter_enabled():
        pairs.append(pytest.param(("triton", "cpu"), id="triton-interpreter"))
    if torch.cuda.is_available():
        pairs.append(pytest.param(("torch", "cuda"), id="torch-cuda"))
        if not interpreter_enabled():
            pairs.append(pytest.param(("triton", "cuda"), id="triton-cuda"))
    return pairs


@pytest.fixture(params=_backend_devices())
def backend_device(request, monkeypatch):
    """Runs the test once per available backend; yields the device to put tensors on."""
    backend, device = request.param
    monkeypatch.setenv("GRADSTATS_BACKEND", backend)
    return torch.device(device)


# The monitor and the real trainers (HF, Lightning, timm, accelerate) run on every CPU
# backend: their tests that do not pick a backend themselves are repeated once per backend.
BATTERY_MODULES = ("test_monitor", "test_monitor_model_changes", "test_monitor_optimizers",
                   "test_integrations_huggingface", "test_integrations_lightning",
                   "test_routing")
BACKEND_FIXTURES = ("backend_device", "triton_device", "battery_backend")


def pytest_generate_tests(metafunc):
    if (metafunc.module.__name__.rpartition(".")[2] in BATTERY_MODULES
            and not any(name in metafunc.fixturenames for name in BACKEND_FIXTURES)):
        cpu_backends = [p for p in _backend_devices() if p.values[0][1] == "cpu"]
        metafunc.fixturenames.append("battery_backend")
        metafunc.parametrize("battery_backend", cpu_backends, indirect=True)


@pytest.fixture
def battery_backend(request, monkeypatch):
    """The backend a battery test runs on (see ``BATTERY_MODULES``); parametrized by
    ``pytest_generate_tests``."""
    backend, device = request.param
    monkeypatch.setenv("GRADSTATS_BACKEND", backend)
    return torch.device(device)


@pytest.fixture(params=[p for p in _backend_devices() if p.values[0][0] == "triton"] or
                [pytest.param(None, marks=pytest.mark.skip(reason="no Triton backend here"))])
def triton_device(request, monkeypatch):
    """Only the Triton backends (interpreter or CUDA)."""
    backend, device = request.param
    monkeypatch.setenv("GRADSTATS_BACKEND", backend)
    return torch.device(device)


@pytest.fixture
def small_chunks(monkeypatch):
    """Tiny chunks and blocks, so small tensors cross chunk and block edges."""
    tiny = config.LaunchConfig(chunk=256, block=64, num_warps=2)
    monkeypatch.setattr(config, "INTERPRETER_CONFIG", tiny)
    monkeypatch.setattr(config, "GPU_CONFIGS", {dtype: tiny for dtype in config.GPU_CONFIGS})
    worklist.clear_plan_cache()
    yield tiny
    worklist.clear_plan_cache()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture(autouse=True)
def _no_known_tensor_lists():
    """Each test starts with no remembered lists and no arming back-off: the lists of
    earlier tests die unrecognised, which would otherwise switch arming off."""
    known_tensors.forget_all()


@pytest.fixture(params=["land-at-once", "land-late"])
def landing(request, monkeypatch):
    """``land-late``: the host copies never report ready by themselves, so records land only
    when the monitor waits (flush, close), as with a GPU running behind the host: each
    record must still carry the step it was taken at."""
    if request.param == "land-late":
        from gradstats import record_queue

        def never_ready(device):
            return (lambda: False), (lambda: None)
        monkeypatch.setattr(record_queue, "copy_fence", never_ready)
    return request.param
