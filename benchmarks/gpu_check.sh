#!/usr/bin/env bash
# The GPU check of issue 12 in one command (under 8 minutes on an H100/H200 with PyTorch + CUDA 13,
# onnx and a CPU onnxruntime; no TensorRT, no package index). Leaves at most 5 files in $OUT:
# env.txt, pytest.txt, gpu_bench.log, gpu_check_<gpu>.json and gpu_check_<gpu>.md (parity of every
# CUDA variant vs the fp32 reference, cddrec-bench timings at batch 1/4096/16384, cddrec-infer on
# 1M requests, the three targets). Copy the two gpu_check_* files to benchmarks/results/.
#
# Device-run sequence (a future session with a lent GPU), from the repository root:
#   on the development machine, once:
#     ../shared/tools/ort-gpu-carry        # .ortgpu/setup.sh + the wheel's parts .ortgpu1 .. .ortgpuN (N=5 for 1.31.1)
#     bash benchmarks/gpu_check.sh --prepare   # .gpu_site: click, tqdm, pyyaml, pytest (pure Python) for the GPU image
#   then `run` calls one right after another on the same warm machine (the parts must meet there):
#     i = 1 .. N-1:  command "bash benchmarks/gpu_check.sh"   carry [".ortgpu", ".ortgpu<i>"]   (collects part i, exits)
#     i = N:         command "bash benchmarks/gpu_check.sh"   carry [".ortgpu", ".ortgpuN", ".gpu_site"]  timeout_s 540
#   The last call installs onnxruntime-gpu and runs the check. Without .ortgpu (onnxruntime-gpu
#   already installed) a single call does everything.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd); cd "$root"

if [ "${1:-}" = "--prepare" ]; then  # on the development machine: pure-Python dependencies to carry
  rm -rf .gpu_site && mkdir .gpu_site
  python3 - <<'PY'
import importlib, shutil, pathlib
for name in ("click", "tqdm", "yaml", "pytest", "_pytest", "pluggy", "iniconfig", "packaging", "py"):
    try:
        mod = importlib.import_module(name)
    except ImportError:
        continue
    src = pathlib.Path(mod.__file__)
    src = src.parent if src.name == "__init__.py" else src
    dst = pathlib.Path(".gpu_site") / src.name
    (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst, **({"ignore": shutil.ignore_patterns("__pycache__", "*.so")} if src.is_dir() else {}))
    print("carried", name)
PY
  du -sh .gpu_site; exit 0
fi

OUT=${OUT:-/tmp/cddrec-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -f .ortgpu/setup.sh ] && [ ! -f /tmp/ortgpu.env ]; then
  bash .ortgpu/setup.sh || { echo "onnxruntime-gpu setup failed"; exit 1; }
  if [ ! -f /tmp/ortgpu.env ]; then echo "part collected; send the next command (see the header)"; exit 0; fi
fi
[ -f /tmp/ortgpu.env ] && source /tmp/ortgpu.env
# the checkout itself (cddrec/export, cddrec/runtime, cddrec/benchmarks link the top-level folders);
# the image's packages first, the carried pure-Python ones after them
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}:$root/.gpu_site"

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  python3 - <<'PY'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for m in ("onnx", "onnxruntime", "click", "tqdm", "yaml", "pytest", "cddrec"):
    try:
        mod = importlib.import_module(m); print(m, getattr(mod, "__version__", "?"), getattr(mod, "__file__", ""))
    except ImportError as e:
        print(m, "missing", e)
import onnxruntime as o; print("providers", o.get_available_providers())
PY
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 1) GPU-marked tests: ort-cuda / ort-cuda-graph / torch-cuda parity (fp32 and fp16), bucket padding (~1-2 min)
timeout 130 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu_serving.py tests/test_runtime.py \
  tests/test_export.py > "$OUT/pytest.txt" 2>&1
echo "pytest rc $?" >> "$OUT/pytest.txt"; tail -n 5 "$OUT/pytest.txt"

# 2) export + parity + cddrec-bench + cddrec-infer on the paper-size random model (~3-5 min)
timeout 330 python3 -m cddrec.benchmarks.gpu_bench --out "$OUT" --seconds 1.0 --requests 1000000 \
  > "$OUT/gpu_bench.log" 2>&1
echo "gpu_bench rc $?" >> "$OUT/gpu_bench.log"; tail -n 45 "$OUT/gpu_bench.log"
ls -la "$OUT"
