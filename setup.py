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
RAY = ["ray[data,serve]>=2.9"]
# cddrec-serve: an ASGI app on uvicorn (uvloop, httptools), orjson bodies, Prometheus metrics
SERVE_ONLINE = ["starlette>=0.37", "uvicorn[standard]>=0.29", "orjson>=3.9", "prometheus-client>=0.20"]
TRITON_CLIENT = ["tritonclient[http]>=2.40", "protobuf>=4"]
DOCS = ["mkdocs>=1.6", "mkdocs-material>=9.5"]

setup(
    name="cddrec",
    version=VERSION,
    description="Conditional Denoising Diffusion for Sequential Recommendation: train, evaluate, export, serve",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=["cddrec", "cddrec.app", "cddrec.export", "cddrec.runtime", "cddrec.runtime.server", "cddrec.benchmarks"],
    package_dir={
        "cddrec": "cddrec",
        "cddrec.export": "export",
        "cddrec.runtime": "runtime",
        "cddrec.benchmarks": "benchmarks",
    },
    # the core install serves exported graphs (cddrec-infer, Recommender on ort-cpu/ort-cuda) without
    # PyTorch; training, evaluation and export need the [train] extra
    install_requires=SERVE + SERVE_ONLINE,
    extras_require={
        "train": TRAIN,
        "ray": RAY,
        "gpu": ["onnxruntime-gpu>=1.17", "tensorrt>=10.0", "cuda-python>=12"],
        "triton": TRITON_CLIENT,  # config.pbtxt schema, the Triton client codec, cddrec-bench --serve
        "plots": ["matplotlib>=3.7"],
        "docs": DOCS,
        # everything the tests and the docs build need: about 2.5 GB with torch and Ray
        "dev": TRAIN + RAY + TRITON_CLIENT + DOCS + ["pytest>=7", "ruff>=0.4", "matplotlib>=3.7", "psutil>=5.9",
                                                   "hypothesis>=6.100", "import-linter>=2.1", "httpx>=0.27",
                                                   "aiohttp>=3.9"],
    },
    entry_points={
        # backends that need torch: the runtime finds them here, never by a module path of its own
        "cddrec.backends": [
            "torch=cddrec.export.torch_serving:TorchReference",
            "torch-fast=cddrec.export.torch_serving:TorchFast",
            "torch-compile=cddrec.export.torch_serving:TorchCompiled",
            "torch-cuda=cddrec.export.torch_serving:TorchCuda",
            "torch-cuda-fp16=cddrec.export.torch_serving:TorchCudaHalf",
        ],
        "console_scripts": [
            "cddrec-train=cddrec.app.train:main",
            "cddrec-eval=cddrec.app.evaluate:main",
            "cddrec-demo=cddrec.app.demo:main",
            "cddrec-export=cddrec.app.export:main",
            "cddrec-infer=cddrec.app.infer:main",
            "cddrec-bench=cddrec.app.bench:main",
            "cddrec-serve=cddrec.app.serve:main",
        ],
    },
)
