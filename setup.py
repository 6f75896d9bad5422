"""cddrec: CDDRec training, paper-protocol evaluation, ONNX/TensorRT export and batched serving.

The top-level folders ``export/``, ``runtime/`` and ``benchmarks/`` install as
``cddrec.export``, ``cddrec.runtime`` and ``cddrec.benchmarks`` (never as bare top-level
packages, which would collide with other distributions).
"""

import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "cddrec" / "__init__.py").read_text()).group(1)

SERVE = ["numpy>=1.24", "click>=8.1", "tqdm>=4.60", "pyyaml>=6.0", "onnxruntime>=1.17", "pyarrow>=12",
         "polars>=1.0"]
TRAIN = ["torch>=2.1", "onnx>=1.15", "onnxscript>=0.1"]
RAY = ["ray[data]>=2.9"]

setup(
    name="cddrec",
    version=VERSION,
    description="Conditional Denoising Diffusion for Sequential Recommendation: train, evaluate, export, serve",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=["cddrec", "cddrec.app", "cddrec.export", "cddrec.runtime", "cddrec.benchmarks"],
    package_dir={
        "cddrec": "cddrec",
        "cddrec.export": "export",
        "cddrec.runtime": "runtime",
        "cddrec.benchmarks": "benchmarks",
    },
    # the core install serves exported graphs (cddrec-infer, Recommender on ort-cpu/ort-cuda) without
    # PyTorch; training, evaluation and export need the [train] extra
    install_requires=SERVE,
    extras_require={
        "train": TRAIN,
        "ray": RAY,
        "gpu": ["onnxruntime-gpu>=1.17", "tensorrt>=10.0", "cuda-python>=12"],
        "triton": ["tritonclient[http]>=2.40", "protobuf>=4"],  # config.pbtxt schema + the README client
        "plots": ["matplotlib>=3.7"],
        "dev": TRAIN + RAY + ["pytest>=7", "ruff>=0.4", "matplotlib>=3.7", "psutil>=5.9", "hypothesis>=6.100",
                              "import-linter>=2.0", "tritonclient[grpc]>=2.40"],
    },
    entry_points={
        "console_scripts": [
            "cddrec-train=cddrec.app.cli:train_main",
            "cddrec-eval=cddrec.app.cli:eval_main",
            "cddrec-demo=cddrec.app.cli:demo_main",
            "cddrec-export=cddrec.app.cli:export_main",
            "cddrec-infer=cddrec.app.cli:infer_main",
            "cddrec-bench=cddrec.app.cli:bench_main",
        ],
    },
)
