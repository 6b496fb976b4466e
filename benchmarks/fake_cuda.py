"""Compile Triton kernels for a real NVIDIA target on a machine without a GPU.

Triton's JIT asks its active driver which GPU it is compiling for. :func:`compile_only`
installs a driver that answers ``GPUTarget("cuda", cc, 32)`` and makes every
``JITFunction.run`` a warm-up: the JIT binds the real arguments, derives the
specialization a GPU launch would get (signature, constexprs, 16-byte divisibility of
pointers), compiles it with triton's own NVIDIA backend (TTIR -> LLVM -> PTX -> triton's
bundled ptxas -> cubin), and returns without launching. Each new specialization is
recorded with its artefacts.

What this cannot show: module loading, the C launcher, anything at run time.

Use one target per process: the JIT caches compiled kernels per device index, and the
fake device is always index 0. Works with triton 3.6 and 3.9 (same JIT internals here).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Iterator

import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

# Per-SM shared memory the backend may ask about when it sizes a kernel.
_SHARED_MEMORY_BYTES = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
_SM_COUNT = {80: 108, 90: 132}


class _FakeCudaDriver:
    """Just enough of triton's CUDA driver for the JIT to compile: the target, a device
    index and stream for the cache keys, and device properties."""

    def __init__(self, cc: int):
        self.cc = cc
        self.utils = self  # the JIT reads driver.utils.get_device_properties
        self.launcher_cls = None

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", self.cc, 32)

    def get_current_device(self) -> int:
        return 0

    def set_current_device(self, device) -> None:
        pass

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_device_capability(self, device=None) -> tuple[int, int]:
        return divmod(self.cc, 10)

    def get_device_properties(self, device) -> dict:
        return {"max_shared_mem": _SHARED_MEMORY_BYTES.get(self.cc, 101376),
                "multiprocessor_count": _SM_COUNT.get(self.cc, 108),
                "max_num_regs": 65536, "warpSize": 32}

    def get_active_torch_device(self):
        import torch
        return torch.device("cpu")  # where the caller's tensors live

    def get_device_interface(self):
        import torch
        return torch.cuda

    @staticmethod
    def is_active() -> bool:
        return True

    def map_python_to_cpp_type(self, ty: str) -> str:
        from triton.backends.nvidia.driver import ty_to_cpp
        return ty_to_cpp(ty)


@dataclass
class Specialization:
    """One kernel specialization the JIT compiled (or failed to compile)."""

    kernel: str  # the @triton.jit function's name
    module: str
    constexprs: dict[str, str]  # argument name -> value as text (tl dtypes as "fp32", ...)
    signature: dict[str, str]  # argument name -> triton type ("*fp32", "i32", "constexpr")
    aligned_args: list[str]  # pointer arguments the JIT saw 16-byte aligned
    num_warps: int
    seconds: float
    error: str | None = None
    asm: dict = field(default_factory=dict, repr=False)  # "ptx", "cubin", ... when compiled

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Recorder:
    """What :func:`compile_only` saw: new specializations, and launches that failed before
    reaching the compiler (argument binding)."""

    compiled: list[Specialization] = field(default_factory=list)
    launch_errors: list[tuple[str, str]] = field(default_factory=list)  # (kernel, error)
    launches: int = 0


def _text(value) -> str:
    # Module-level constants reach the JIT wrapped (tl.constexpr(0)); show the value.
    return str(value.value if isinstance(value, tl.constexpr) else value)


def _arg_name(fn: JITFunction, path: tuple) -> str:
    # The JIT keys constexprs and attributes by their path in the argument list.
    name = fn.params[path[0]].name
    return name + "".join(f"[{i}]" for i in path[1:])


@contextlib.contextmanager
def compile_only(cc: int) -> Iterator[Recorder]:
    """Within the block, Triton kernel launches compile for ``sm_<cc>`` and do not run."""
    recorder = Recorder()
    original_run, original_do_compile = JITFunction.run, JITFunction._do_compile
    saved_driver = getattr(driver, "_active", None)
    touched: set = set()

    def run(self, *args, grid, warmup, **kwargs):
        recorder.launches += 1
        touched.add(self)
        compiled_before = len(recorder.compiled)
        try:
            return original_run(self, *args, grid=grid, warmup=True, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the caller's scenario goes on; we report
            if len(recorder.compiled) == compiled_before:  # failed before the compiler
                recorder.launch_errors.append((self.fn.__name__, f"{type(exc).__name__}: {exc}"))
            return None

    def do_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        start = time.perf_counter()
        spec = Specialization(
            kernel=self.fn.__name__, module=self.fn.__module__,
            constexprs={_arg_name(self, path): _text(value) for path, value in constexprs.items()},
            signature=dict(signature),
            aligned_args=sorted(_arg_name(self, path) for path, values in attrs.items()
                                if ["tt.divisibility", 16] in [list(v) for v in values]),
            num_warps=options.num_warps, seconds=0.0)
        recorder.compiled.append(spec)
        try:
            kernel = original_do_compile(self, key, signature, device, constexprs, options,
                                         attrs, warmup)
        except Exception as exc:
            spec.error = f"{type(exc).__name__}: {exc}"[:4000]
            raise
        finally:
            spec.seconds = time.perf_counter() - start
        spec.asm = dict(kernel.asm)
        return kernel

    driver.set_active(_FakeCudaDriver(cc))
    JITFunction.run, JITFunction._do_compile = run, do_compile
    try:
        yield recorder
    finally:
        JITFunction.run, JITFunction._do_compile = original_run, original_do_compile
        driver.set_active(saved_driver)
        for fn in touched:  # their caches hold kernels for the fake device
            fn.device_caches.clear()
