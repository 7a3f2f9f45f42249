"""fastarcher: a lean ArCHer trainer for multi-turn LLM agents.

`kernels/` lives at the top of the repository but installs as `fastarcher.kernels`, so that it never
shadows PyPI's `kernels` package (required by sglang, probed by transformers).
"""
from setuptools import setup

packages = [
    "fastarcher",
    "fastarcher.envs",
    "fastarcher.rollout",
    "fastarcher.algos",
    "fastarcher.checkpoint",
    "fastarcher.traces",
    "fastarcher.tools",
    "fastarcher.kernels",
]

SGLANG_PURE_PYTHON = ["numpy", "orjson", "psutil", "pybase64", "requests", "pillow", "starlette", "msgspec",
                      "pyzmq", "tqdm", "ipython", "pydantic", "aiohttp"]

setup(
    name="fastarcher",
    version="0.1.0",
    description="Lean, fast ArCHer (hierarchical multi-turn RL) trainer for LLM agents on PyTorch + FSDP2",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"fastarcher.kernels": "kernels"},
    package_data={"fastarcher": ["../configs/*.yaml"]},
    install_requires=[
        "torch>=2.6",
        "transformers>=4.46",
        "tokenizers",
        "numpy",
        "tyro>=0.9",
        "wandb",
        "pyyaml",
        "rich",
        "matplotlib",
        "safetensors",
        "peft",
        "triton; platform_system=='Linux'",
    ],
    extras_require={
        # The tests of the sglang engine import sglang's CPU-side classes. sglang pins torch exactly, so it is
        # installed apart with --no-deps (README); these are the pure-Python packages those classes import.
        "test": ["pytest", "pytest-benchmark", *SGLANG_PURE_PYTHON],
        # --rollout.engine sglang on a GPU: `pip install --no-deps sglang` first, then this extra.
        "sglang": SGLANG_PURE_PYTHON,
        "flash": ["flash-attn"],
        # benchmarks/bench_trl.py: TRL's GRPOTrainer beside ours (pinned in constraints.txt; torch stays ours)
        "bench": ["trl", "datasets"],
    },
)
