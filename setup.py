"""Packaging for archer-mcore.

`kernels/` lives at the top of the repository (it is the Triton kernel library); its
sources sit in `kernels/src/` and install as `archer_mcore.kernels`. `kernels/` itself has
no `__init__.py`: from the repository root (`python -m ...`, `python -m pytest`) a regular
package there would shadow Hugging Face's `kernels`, which transformers imports
(tests/test_no_shadowing.py).
"""

from setuptools import find_packages, setup

_packages = find_packages(include=["archer_mcore", "archer_mcore.*"])
_packages += ["archer_mcore.kernels"] + [
    "archer_mcore.kernels." + p for p in find_packages(where="kernels/src")
]

setup(
    name="archer-mcore",
    version="0.1.0",
    description="Megatron-core RLVR trainer: Archer dual-token constraints, forking tokens, DAPO",
    python_requires=">=3.11",
    packages=_packages,
    package_dir={"archer_mcore.kernels": "kernels/src"},
    package_data={"archer_mcore": ["py.typed", "config/recipes/*.yaml"]},
    install_requires=[
        "torch==2.13.0",
        "megatron-core==0.16.1",
        "transformers>=5,<6",
        "triton>=3,<4",
        "safetensors>=0.4",
        "pyyaml>=6",
        "prometheus-client>=0.20",
        "math-verify>=0.7",
        "numpy",
        "psutil",
        "httpx2>=2.16",
        "packaging",
    ],
    extras_require={
        "parquet": ["pyarrow>=15"],
        "fp8": ["nvidia-modelopt==0.47.0", "requests"],  # modelopt imports requests
        "router": ["sglang-router==0.3.2"],
        "bench": ["matplotlib>=3.8"],
        # Experiment trackers (metrics.trackers); each is checked for at config load.
        "tensorboard": ["tensorboard>=2.14"],
        "wandb": ["wandb>=0.19"],
        "mlflow": ["mlflow-skinny>=3"],  # the client; the tracking server is `pip install mlflow`
        # The tests run the real router, Parquet reading and the ModelOpt FP8 export.
        "test": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "hypothesis>=6",
            "ruff>=0.6",
            "pyarrow>=15",
            "sglang-router==0.3.2",
            "nvidia-modelopt==0.47.0",
            "requests",
            "matplotlib>=3.8",  # benchmarks/algorithms.py's smoke test draws its PNG
            # tests/monitoring/test_trackers.py reads the trackers' files back (MLflow
            # through a file store: mlflow-skinny has no server). mlflow-skinny 3.x pins
            # opentelemetry-sdk, which pins opentelemetry-api exactly: the lock holds
            # api 1.45.2 (only fastapi needs it, >= 1.44).
            "tensorboard>=2.14",
            "wandb>=0.19",
            "mlflow-skinny>=3",
        ],
        # Only GPU clusters install these (apex is built from NVIDIA's source, not PyPI).
        # SGLang pinned: the rollout engine speaks 0.5.23's weight-update protocol
        # (archer_mcore/rollout/sglang_protocol.py SUPPORTED_SGLANG).
        "gpu": ["transformer-engine[pytorch]", "sglang==0.5.23", "sglang-router==0.3.2",
                "nvidia-modelopt"],
    },
    entry_points={"console_scripts": ["archer=archer_mcore.cli:main"]},
)
