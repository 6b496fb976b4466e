"""gradstats: fused gradient statistics and drop-in clipping for PyTorch (Triton kernels).

Pure Python for now: the Triton kernels compile at run time, and this file imports nothing
but setuptools. Install into an environment that already has the torch you want (``make
test`` / ``make demo`` set one up): ``pip install --no-build-isolation .`` builds with that
environment's setuptools, and stays right once a native extension needs torch at build time.
"""
from setuptools import find_packages, setup

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
        # trainers. (timm is installed by `make test` with --no-deps: it requires torchvision,
        # whose PyPI wheels are CUDA builds that would replace a CPU torch.)
        "test": ["pytest", "pytest-benchmark", "numpy", "tensorboard",
                 "transformers", "accelerate", "lightning"],
        # The monitor's optional sinks: "tensorboard:DIR" and "wandb".
        "tensorboard": ["tensorboard"],
        "wandb": ["wandb"],
        # matplotlib: the plot python -m benchmarks.run draws beside its tables.
        "bench": ["pytest-benchmark", "matplotlib"],
    },
    license="BSD-3-Clause",
    license_files=["LICENSE"],
    author="the gradstats developers",
    classifiers=[
        "License :: OSI Approved :: BSD License",
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
