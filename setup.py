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

setup(
    name="cddrec",
    version=VERSION,
    description="Conditional Denoising Diffusion for Sequential Recommendation: train, evaluate, export, serve",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=["cddrec", "cddrec.export", "cddrec.runtime", "cddrec.benchmarks"],
    package_dir={
        "cddrec": "cddrec",
        "cddrec.export": "export",
        "cddrec.runtime": "runtime",
        "cddrec.benchmarks": "benchmarks",
    },
    install_requires=[
        "torch>=2.1",
        "numpy>=1.24",
        "click>=8.1",
        "tqdm>=4.60",
        "onnx>=1.15",
        "onnxruntime>=1.17",
        "pyyaml>=6.0",
        "pyarrow>=12",
        "polars>=1.0",
    ],
    extras_require={
        "dev": ["pytest>=7", "ruff>=0.4", "onnxscript>=0.1", "pyarrow>=12", "polars>=1.0", "matplotlib>=3.7",
                "psutil>=5.9", "hypothesis>=6", "ray[data]>=2.9"],
        "gpu": ["onnxruntime-gpu>=1.17", "tensorrt>=8.6"],
        "parquet": ["pyarrow>=12"],
        "ray": ["ray[data]>=2.9"],
        "plots": ["matplotlib>=3.7"],
    },
    entry_points={
        "console_scripts": [
            "cddrec-train=cddrec.cli:train_main",
            "cddrec-eval=cddrec.cli:eval_main",
            "cddrec-demo=cddrec.cli:demo_main",
            "cddrec-export=cddrec.cli:export_main",
            "cddrec-infer=cddrec.cli:infer_main",
            "cddrec-bench=cddrec.cli:bench_main",
        ]
    },
)
