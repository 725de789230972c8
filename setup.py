from pathlib import Path

from setuptools import find_packages, setup

# The training tools (paddle-ema-train ..., tools/*.py): YAML configs, the bundled digits data
# (scikit-learn), progress bars, curves and VisualDL scalars. The EMA library needs none of them.
TOOLS = ["pyyaml", "visualdl", "scikit-learn", "tqdm", "matplotlib"]
TEST = ["pytest>=7", "pytest-timeout", "hypothesis>=6"]

setup(
    name="paddle_ema",
    version="0.1.0",
    description="Exponential moving averages of PaddlePaddle model weights: dygraph, static graphs, "
    "PaddleDetection-style tools",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    # Supported and measured: Python 3.10-3.13 (the classifiers), PaddlePaddle 2.6.2-3.3.x
    # (docs/install.md). No upper bound: a cap would refuse a newer Python that Paddle gains wheels
    # for; Paddle's own wheels are what limit it today.
    python_requires=">=3.10",
    packages=find_packages(include=["paddle_ema", "paddle_ema.*"]) + ["paddle_ema.configs"],
    # The repository's configs/ ships as paddle_ema/configs/, so that the tools find them by name
    # from a plain install (paddle_ema/config/packaged.py); in the repository they stay where
    # README's commands expect them.
    package_dir={"paddle_ema.configs": "configs"},
    # The kernels' C++/CUDA sources are compiled on the user's machine at first use.
    package_data={
        "paddle_ema.kernels": ["csrc/*.cc", "csrc/*.cu", "csrc/*.h", "csrc/*.cuh"],
        "paddle_ema.configs": ["*.yml", "*/*.yml"],
    },
    # No hard requirement on a Paddle build: `paddlepaddle` (CPU) and `paddlepaddle-gpu` are
    # different distributions, and requiring one would install it over the other. paddle_ema
    # says at import how to install one; the `cpu` extra installs the CPU build.
    install_requires=["numpy"],
    extras_require={
        "cpu": ["paddlepaddle>=2.6.2,<3.4"],
        "tools": TOOLS,
        # paddle_ema.integrations.paddleformers (EMACallback for PaddleFormers' Trainer); measured
        # with 1.2.0, after which `pip install "numpy>=2"` is needed (docs/paddleformers.md).
        "paddleformers": ["paddleformers>=1.2,<1.3"],
        # What the test suite needs: it also runs the tools and builds the wheel.
        "test": TOOLS + TEST,
    },
    entry_points={
        "console_scripts": [
            "paddle-ema-train=paddle_ema.engine.cli:train_main",
            "paddle-ema-eval=paddle_ema.engine.cli:eval_main",
            "paddle-ema-export=paddle_ema.engine.cli:export_main",
            "paddle-ema-average=paddle_ema.engine.cli:average_main",
            "paddle-ema-posthoc=paddle_ema.engine.cli:posthoc_main",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
