"""gradstats: fused gradient statistics and drop-in clipping for PyTorch (Triton kernels).

The Triton kernels compile at run time. The native CPU layer (``csrc/`` -> ``gradstats._C``)
is built here when torch and a C++ compiler are present at build time, so install into an
environment that already has the torch you want (``make test`` / ``make demo`` set one up)
with ``pip install --no-build-isolation .``: the extension must be built against the torch
it will load into. Without torch, or with ``GRADSTATS_NO_NATIVE=1``, gradstats installs as
pure Python and the CPU path uses the PyTorch reference.
"""
import os
import platform
import shutil
import sysconfig
import warnings

from setuptools import find_packages, setup

NO_NATIVE_ENV = "GRADSTATS_NO_NATIVE"


def _native_build() -> dict:
    """setup() arguments that build ``gradstats._C``; none when it cannot or should not be."""
    if os.environ.get(NO_NATIVE_ENV, "0") not in ("", "0"):
        return {}
    # GCC/Clang vector extensions and torch's OpenMP build: tested on Linux only.
    if platform.system() != "Linux":
        return {}
    try:  # imported here: a pure-Python install must work without torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        return {}
    compiler = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
    if shutil.which(compiler.split()[0]) is None:
        return {}
    extension = CppExtension(
        "gradstats._C",
        ["csrc/cpu_stats.cpp", "csrc/cpu_apply.cpp", "csrc/host_path.cpp",
         "csrc/direct_calls.cpp"],
        # at::parallel_for runs on torch's own thread pool (OpenMP in torch's CPU builds).
        # -fno-trapping-math: lets -O3 vectorise the branch-free histogram loop (it computes
        # a float product on every lane); results are unchanged, nothing reads FP flags.
        # -ffp-contract=off: no fused multiply-add in the AVX-512 clone (C++'s default
        # contracts), so every CPU gives the same bits. -std=c++20: std::bit_cast and
        # std::atomic_ref, whatever standard the torch at hand asks for.
        extra_compile_args=["-O3", "-std=c++20", "-fno-trapping-math", "-ffp-contract=off",
                            "-fopenmp"],
        extra_link_args=["-fopenmp"],
    )
    # ninja builds in parallel and skips unchanged files; the setuptools compiler otherwise.
    build = BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)

    class OptionalNativeBuild(build):
        """A failed native build leaves a working pure-Python install (the CPU path then
        uses the PyTorch reference) instead of a failed install."""

        def run(self):
            try:
                super().run()
            except Exception as error:  # compiler, headers, linker: any of them
                warnings.warn(f"gradstats: the native CPU layer (gradstats._C) was not "
                              f"built, the CPU path will use the PyTorch reference: {error}")

    return {"ext_modules": [extension], "cmdclass": {"build_ext": OptionalNativeBuild}}


setup(
    name="gradstats",
    version="0.1.0",
    description="One fused pass over every gradient: norms, NaN/Inf counts, log2 histograms "
                "and drop-in clipping for PyTorch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(exclude=["tests", "tests.*", "benchmarks", "benchmarks.*"]),
    python_requires=">=3.10",
    # triton ships wheels for Linux only; elsewhere the CPU path (which never imports it)
    # still installs and runs.
    install_requires=["torch>=2.6", 'triton>=3.4; platform_system == "Linux"'],
    extras_require={
        # numpy: the tests' independent float64 reference (np.frexp, exact histograms);
        # tensorboard: its own event reader checks what the TensorBoard sink writes;
        # transformers + accelerate, lightning: the integrations are tested against the real
        # trainers; matplotlib: the diagnosis figures are drawn, not skipped. (timm is
        # installed by `make test` with --no-deps: it requires torchvision, whose PyPI wheels
        # are CUDA builds that would replace a CPU torch.)
        "test": ["pytest", "pytest-benchmark", "numpy", "tensorboard",
                 "transformers", "accelerate", "lightning", "matplotlib"],
        # The monitor's optional sinks: "tensorboard:DIR" and "wandb".
        "tensorboard": ["tensorboard"],
        "wandb": ["wandb"],
        # matplotlib: the plot python -m benchmarks.run draws beside its tables.
        "bench": ["pytest-benchmark", "matplotlib"],
        # matplotlib: gradstats.plots and the figures of `python -m gradstats report`.
        "plots": ["matplotlib"],
    },
    # `gradstats demo`, `gradstats report LOG.jsonl`: the same as `python -m gradstats ...`.
    entry_points={"console_scripts": ["gradstats = gradstats.__main__:console_main"]},
    license="BSD-3-Clause",
    license_files=["LICENSE"],
    author="the gradstats developers",
    classifiers=[
        "License :: OSI Approved :: BSD License",
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    **_native_build(),
)
