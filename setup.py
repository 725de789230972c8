from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="paddle_ema",
    version="0.1.0",
    description="Exponential moving averages of PaddlePaddle model weights: dygraph, static graphs, "
    "PaddleDetection-style tools",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["paddle_ema", "paddle_ema.*"]),
    # The kernels' C++/CUDA sources are compiled on the user's machine at first use.
    package_data={"paddle_ema.kernels": ["csrc/*.cc", "csrc/*.cu", "csrc/*.h", "csrc/*.cuh"]},
    # No hard requirement on a Paddle build: `paddlepaddle` (CPU) and `paddlepaddle-gpu` are
    # different distributions, and requiring one would install it over the other. paddle_ema
    # says at import how to install one; the `cpu` extra installs the CPU build.
    # The training tools need scikit-learn (the bundled digits data), tqdm (progress) and
    # matplotlib (curves); all are small and wheel-only.
    install_requires=["numpy", "pyyaml", "visualdl", "scikit-learn", "tqdm", "matplotlib"],
    extras_require={
        "cpu": ["paddlepaddle>=3.0"],
        "test": ["pytest>=7", "pytest-timeout", "hypothesis>=6"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
