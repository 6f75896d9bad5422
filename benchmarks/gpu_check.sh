#!/usr/bin/env bash
# One prepared run for a lent GPU machine (PyTorch with CUDA, onnx, a CPU onnxruntime; no
# TensorRT, no internet). Finishes in well under 8 minutes; results as JSON under $OUT.
#
#   run this from the repository root:  bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/cddrec-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# use the checkout without installing (the image has torch, onnx, onnxruntime); click/tqdm/yaml
# are imported only if present, so install what is missing from carried wheels if needed
python3 - <<'PY' 2>&1 | tee "$OUT/env.txt"
import importlib, torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for m in ("onnx", "onnxruntime", "onnxscript", "tensorrt", "click", "tqdm", "yaml"):
    try:
        mod = importlib.import_module(m); print(m, getattr(mod, "__version__", "?"))
    except ImportError:
        print(m, "missing")
PY
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || export PYTHONPATH="$PWD/.gpu_site:${PYTHONPATH:-}"
# 1) GPU tests (marked gpu) and the parity tests, ~1 min
timeout 150 python3 -m pytest -q -x tests/test_model.py tests/test_export.py tests/test_runtime.py -m "gpu or not gpu" \
    2>&1 | tail -n 30 | tee "$OUT/pytest.txt"
# 2) timings: eager, compile, CUDA graphs, fp16/bf16, ORT, TRT where importable, ~4 min
timeout 300 python3 -m cddrec.benchmarks.gpu_bench --out "$OUT" --seconds 0.4 2>&1 | tail -n 60 | tee "$OUT/bench.txt"
ls -la "$OUT"
