#!/usr/bin/env bash
# The GPU check (issue 21) in one run of at most 7 minutes, leaving 5 files in $OUT: env.txt (machine,
# versions, install log), pytest.txt (the GPU-marked tests), gpu_bench.log, gpu_check_<gpu>.json and
# gpu_check_<gpu>.md (benchmarks/gpu_bench.py: parity of every CUDA variant (ort-cuda, its TF32 option,
# ort-cuda-graph, torch-cuda, torch-cuda-fp16, the fp16 graph, the early-exit graph) against the fp32
# reference under the contract's rule, cddrec-bench at batch 1/4096/16384, cddrec-infer end to end on
# 1M requests, cddrec-serve on ort-cuda under load when that command exists, the three targets).
# Copy the two gpu_check_* files to benchmarks/results/.
#
# The GPU machine's image has Python 3.12 (python3 = /opt/torch/.venv/bin/python3), torch 2.11 +
# CUDA 13, onnx, a CPU onnxruntime, pyarrow, click, tqdm, pyyaml, pytest, hypothesis, uvloop, anyio,
# h11, httpx, prometheus-client, and no package index. What it lacks travels as CPython 3.12 manylinux
# wheels: onnxruntime-gpu (CUDA 13 build), polars + polars-runtime-32, starlette, uvicorn, orjson,
# httptools, and cddrec itself as a wheel (installed, so the package_dir wings cddrec.export/.runtime/
# .benchmarks and the cddrec.backends entry points exist; the checkout's own cddrec/ is never put on
# sys.path: the check runs from an empty folder). The wheels are repacked uncompressed, tarred, xz'ed
# (297 MiB of wheels -> about 224 MiB) and split into parts that each fit one call's 64 MiB with the
# working tree. On the machine: `pip install --no-index --no-deps --no-compile --target`.
#
# DEVICE-CALL SEQUENCE: 4 `run` calls (N = 4 parts: a 224 MiB bundle for onnxruntime-gpu 1.31.1, parts
# of 60 MiB, each call 62 MiB with a working tree of ~2 MiB; --prepare prints the exact N and sizes).
# First, here, in the root of the checkout the device tool sends (the lead's), once:
#     bash benchmarks/gpu_check.sh --prepare     # ~8 min on 2 cores (xz -9): .gpucarry1 .. .gpucarry4, git-ignored
# then the 4 calls one right after another (a machine goes back 30 s after a call's end, and the parts
# must meet on one machine, in /tmp/cddrec-gpu):
#     1: run(command="bash benchmarks/gpu_check.sh", carry=[".gpucarry1"], timeout_s=120)  # collects part 1, exits
#     2: run(command="bash benchmarks/gpu_check.sh", carry=[".gpucarry2"], timeout_s=120)  # part 2
#     3: run(command="bash benchmarks/gpu_check.sh", carry=[".gpucarry3"], timeout_s=120)  # part 3
#     4: run(command="bash benchmarks/gpu_check.sh", carry=[".gpucarry4"], timeout_s=540)  # part 4, install
#        (~30 s), environment, GPU tests (<= 100 s), gpu_bench (the rest): <= 420 s from its start
# Expected device time: the machine's start 1-3 min, calls 1-3 about 0.5 min each (transfers), call 4
# at most 7.5 min: about 10-12 minutes in all, under the 15-minute lease. Measured on an H200
# (2026-11-29): start and call 1 together 30-40 s, calls 2-3 about 6 s each, call 4 192-239 s (install
# 26 s, GPU tests 40 s, gpu_bench the rest): about 5 minutes a round, so a fix and a second round fit;
# give the machine back while you work on a fix (it is held, and counted, 30 s after each call).
# A call that finds earlier parts gone (a fresh machine) prints which it has: start again from call 1.
# On a machine still warm that installed everything, call 4's command alone (no carry) reruns the check; a changed tree is reinstalled from
# the checkout (its cddrec wheel rebuilt there with the image's setuptools).
# Rehearsed without a GPU (see --dry-run): the same 4 calls, each in a fresh copy of the tree with only
# its part, a fake nvidia-smi and an image-like venv (the image's packages, none of the carried ones),
# pass up to gpu_bench's first CUDA call ("CUDA is not available").
#
# Modes:
#     --prepare          download, build and split the wheels for GPU_CHECK_PYVER (default 3.12)
#     --dry-run          the device sequence on this machine without CUDA: every part collected (copied),
#                        installed with GPU_CHECK_PYTHON (e.g. a venv of the image's packages) into a
#                        scratch GPU_CHECK_HOME, then the check on CPU backends with small sizes
#     --install-only     with --dry-run (or on the device): stop after the install and the environment report
#     --source-hash      the checkout's source hash, as a device record names it next to the commit
# Environment: GPU_CHECK_PYTHON (python3), GPU_CHECK_HOME (/tmp/cddrec-gpu), GPU_CHECK_PYVER (3.12),
# GPU_CHECK_BUDGET (420 seconds for the final call), GPU_CHECK_XZ_LEVEL (9; 1 for a quick rehearsal
# bundle), GPU_CHECK_WHEELS (the pinned list below), OUT (the device tool's result folder).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd); cd "$root"
PY=${GPU_CHECK_PYTHON:-python3}
PYVER=${GPU_CHECK_PYVER:-3.12}
BUDGET=${GPU_CHECK_BUDGET:-420}
START=$(date +%s)
# what the image lacks, pinned to the versions the test suite runs with
WHEELS=${GPU_CHECK_WHEELS:-"onnxruntime-gpu==1.31.1 polars==2.1.0 polars-runtime-32==2.1.0 starlette==1.10.0 uvicorn==0.54.0 orjson==3.13.0 httptools==0.9.0"}
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64"
MIB=$((1024 * 1024))

mode=device; install_only=0
for a in "$@"; do
  case "$a" in
    --prepare) mode=prepare ;; --dry-run) mode=dry-run ;; --install-only) install_only=1 ;;
    --source-hash) mode=source-hash ;;
    *) echo "unknown option $a (--prepare, --dry-run, --install-only, --source-hash)"; exit 2 ;;
  esac
done
if [ "$mode" = dry-run ]; then WORK=${GPU_CHECK_HOME:-$(mktemp -d /tmp/cddrec-gpu-dry.XXXXXX)}; else WORK=${GPU_CHECK_HOME:-/tmp/cddrec-gpu}; fi

source_hash() {  # what the cddrec wheel is built from: its packages' modules, setup.py and pyproject.toml
  "$1" - "$root" <<'PY'
import hashlib, pathlib, subprocess, sys
root, h = pathlib.Path(sys.argv[1]), hashlib.sha256()
tops = ("cddrec", "export", "runtime", "benchmarks")
try:  # in a git checkout, the files that travel to the device (tracked, or untracked and not ignored)
    out = subprocess.run(["git", "-C", str(root), "ls-files", "-co", "--exclude-standard", "-z", "--", *tops],
                         capture_output=True, check=True).stdout.decode()
    files = [root / f for f in out.split("\0") if f]
except (OSError, subprocess.CalledProcessError):  # on the device: the files that travelled
    files = [p for top in tops for p in (root / top).rglob("*")]
files = [p for p in files if p.is_file() and p.suffix == ".py" and "__pycache__" not in p.parts]  # the wheel's files
for p in sorted(files) + [root / "setup.py", root / "pyproject.toml"]:
    h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
print(h.hexdigest())
PY
}

build_wheel() {  # PYTHON DIR: the cddrec wheel of the checkout into DIR, leaving no build folders behind
  local had; had=$(ls -d "$root/build" "$root"/*.egg-info 2>/dev/null)
  "$1" -m pip wheel -q --no-deps --no-build-isolation --no-index -w "$2" "$root" >/dev/null
  local rc=$?
  [ -z "$had" ] && rm -rf "$root/build" "$root"/*.egg-info
  return $rc
}

# ----------------------------------------------------------------------------------- --prepare
prepare() {
  local tmp; tmp=$(mktemp -d)
  echo "downloading CPython $PYVER manylinux wheels: $WHEELS"
  # shellcheck disable=SC2086
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp $PLATFORMS \
    -d "$tmp/wheels" $WHEELS 2>&1 | grep -v "is ignored" || true
  [ "$(ls "$tmp/wheels" | wc -l)" -eq "$(echo $WHEELS | wc -w)" ] || { echo "download failed"; exit 1; }
  echo "building the cddrec wheel from this checkout"
  build_wheel python3 "$tmp/wheels" || { echo "wheel build failed"; exit 1; }
  local src; src=$(source_hash python3)
  python3 - "$tmp/wheels" "$tmp/stored" <<'PY'
# the same wheels, uncompressed (xz packs the raw files better than it packs deflate)
import pathlib, sys, zipfile
src, dst = map(pathlib.Path, sys.argv[1:3]); dst.mkdir()
for w in sorted(src.glob("*.whl")):
    with zipfile.ZipFile(w) as zi, zipfile.ZipFile(dst / w.name, "w", zipfile.ZIP_STORED) as zo:
        for info in zi.infolist():
            data = zi.read(info); info.compress_type = zipfile.ZIP_STORED; zo.writestr(info, data)
    print(f"  {w.name}: {w.stat().st_size / 2**20:.1f} MiB")
PY
  echo "compressing (xz -${GPU_CHECK_XZ_LEVEL:-9}: minutes at -9)"
  tar -C "$tmp/stored" -cf - . | xz -T0 "-${GPU_CHECK_XZ_LEVEL:-9}" -c > "$tmp/bundle.tar.xz" || { echo "compression failed"; exit 1; }
  local size tree part n sha
  size=$(stat -c %s "$tmp/bundle.tar.xz"); sha=$(sha256sum "$tmp/bundle.tar.xz" | cut -d' ' -f1)
  if git rev-parse --git-dir >/dev/null 2>&1; then  # what travels with every call: tracked and untracked-not-ignored files
    tree=$(git ls-files -co --exclude-standard -z | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
  else
    tree=$(du -sb --exclude='.gpucarry*' . | cut -f1)
  fi
  part=$(( 63 * MIB - tree - MIB )); [ "$part" -gt $((60 * MIB)) ] && part=$((60 * MIB))
  [ "$part" -gt $((8 * MIB)) ] || { echo "the working tree ($((tree / MIB)) MiB) leaves no room for parts"; exit 1; }
  n=$(( (size + part - 1) / part ))
  rm -rf .gpucarry[0-9]*
  (cd "$tmp" && split -b "$part" -d -a 2 bundle.tar.xz part.)
  local i=0 p
  for p in "$tmp"/part.*; do
    i=$((i + 1)); mkdir ".gpucarry$i"; mv "$p" ".gpucarry$i/"
    printf 'GPU_CHECK_PARTS=%s\nGPU_CHECK_SHA256=%s\nGPU_CHECK_SOURCE=%s\nGPU_CHECK_PYVER=%s\nGPU_CHECK_WHEELS="%s"\n' \
      "$n" "$sha" "$src" "$PYVER" "$WHEELS" > ".gpucarry$i/manifest.env"
  done
  if git rev-parse --git-dir >/dev/null 2>&1; then
    local ex; ex=$(git rev-parse --git-path info/exclude); mkdir -p "$(dirname "$ex")"
    grep -qx '/.gpucarry*/' "$ex" 2>/dev/null || echo '/.gpucarry*/' >> "$ex"
  fi
  rm -rf "$tmp"
  echo "bundle $((size / MIB)) MiB (sha256 $sha) in $n parts of <= $((part / MIB)) MiB; working tree $((tree / MIB)) MiB"
  for ((i = 1; i <= n; i++)); do
    local t=120; [ "$i" -eq "$n" ] && t=540
    echo "  call $i: run(command=\"bash benchmarks/gpu_check.sh\", carry=[\".gpucarry$i\"], timeout_s=$t)" \
         "  # $(( ($(du -sb ".gpucarry$i" | cut -f1) + tree) / MIB )) MiB with the tree"
  done
}

# ------------------------------------------------------------------------- parts and install
collect() {  # move (on the device) or copy (dry run) the parts this call carries to $WORK/parts
  mkdir -p "$WORK/parts"
  local d
  for d in .gpucarry[0-9]*; do
    [ -d "$d" ] || continue
    cp "$d/manifest.env" "$WORK/manifest.env"
    if [ "$mode" = dry-run ]; then cp "$d"/part.* "$WORK/parts/" 2>/dev/null; else mv "$d"/part.* "$WORK/parts/" 2>/dev/null; fi
  done
  true
}

install() {
  # shellcheck disable=SC1091
  source "$WORK/manifest.env"
  local have; have=$(ls "$WORK/parts" | wc -l)
  echo "parts here: $have of $GPU_CHECK_PARTS ($(cd "$WORK/parts" && ls | tr '\n' ' '))"
  if [ "$have" -lt "$GPU_CHECK_PARTS" ]; then
    local i missing=""
    for ((i = 1; i <= GPU_CHECK_PARTS; i++)); do
      [ -f "$WORK/parts/part.$(printf %02d $((i - 1)))" ] || missing="$missing $i"
    done
    local last first; last=$(ls "$WORK/parts" | tail -1); last=$((10#${last#part.} + 1)); first=${missing# }; first=${first%% *}
    if [ "$first" -lt "$last" ]; then
      echo "parts missing:$missing while part $last is here (a fresh machine?): start again from call 1"; exit 1
    fi
    echo "part collected; send the next call (parts still to come:$missing)"; exit 0
  fi
  cat "$WORK"/parts/part.* > "$WORK/bundle.tar.xz"
  echo "$GPU_CHECK_SHA256  $WORK/bundle.tar.xz" | sha256sum -c - || { echo "the parts do not make the bundle: prepare again"; exit 1; }
  rm -rf "$WORK/wheels" && mkdir -p "$WORK/wheels"
  "$PY" -c "import sys, tarfile; tarfile.open(sys.argv[1], 'r:xz').extractall(sys.argv[2], filter='data')" \
    "$WORK/bundle.tar.xz" "$WORK/wheels" || { echo "could not unpack the bundle"; exit 1; }
  rm -f "$WORK/bundle.tar.xz" "$WORK"/parts/part.*
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" "$WORK"/wheels/*.whl \
    || { echo "pip install --target failed"; exit 1; }
  echo "$GPU_CHECK_SOURCE" > "$WORK/site/.cddrec-source"
  local libs=""
  if nv=$("$PY" -c 'import nvidia; print(" ".join(nvidia.__path__))' 2>/dev/null); then  # torch's CUDA 13 libraries
    # shellcheck disable=SC2086
    libs=$(find $nv -name 'lib*.so*' -printf '%h\n' | sort -u | tr '\n' ':')
  fi
  cat > "$WORK/env.sh" <<ENV
export PYTHONPATH="$WORK/site\${PYTHONPATH:+:\$PYTHONPATH}" PATH="$WORK/site/bin:\$PATH"
export LD_LIBRARY_PATH="$libs\${LD_LIBRARY_PATH:-}"
ENV
  echo "installed into $WORK/site: $(ls "$WORK/wheels" | sed 's/-py3.*//; s/-cp3.*//' | tr '\n' ' ')"
}

refresh_cddrec() {  # the tree that travelled is the truth: rebuild cddrec from it when the installed one differs
  local want have; want=$(source_hash "$PY"); have=$(cat "$WORK/site/.cddrec-source" 2>/dev/null)
  [ "$want" = "$have" ] && return 0
  echo "the checkout differs from the installed cddrec wheel: rebuilding it from the checkout"
  rm -rf "$WORK/wheels-src" && mkdir -p "$WORK/wheels-src"
  build_wheel "$PY" "$WORK/wheels-src" \
    && "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$WORK/site" "$WORK"/wheels-src/cddrec-*.whl \
    && echo "$want" > "$WORK/site/.cddrec-source" || echo "WARNING: rebuilding cddrec failed; the check runs the carried wheel"
}

# -------------------------------------------------------------------------------------- check
left() { echo $(( BUDGET - ($(date +%s) - START) )); }

check() {
  OUT=${OUT:-$WORK/out}; mkdir -p "$OUT" "$WORK/run"
  export PYTHONUNBUFFERED=1
  # the records name the checkout's commit (the installed cddrec has no git metadata) and always its source
  # hash: the device tool's copy may carry git metadata older than the tree it sends (seen 2026-11-30: HEAD of
  # the session's start, the tree of a later commit, so "+dirty"); compare the hash with `--source-hash` here
  local src; src=$(source_hash "$PY" | cut -c1-12)
  if CDDREC_COMMIT=$(git -C "$root" rev-parse --short=12 HEAD 2>/dev/null); then
    [ -n "$(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null)" ] && CDDREC_COMMIT="$CDDREC_COMMIT+dirty"
    CDDREC_COMMIT="$CDDREC_COMMIT (source sha256 $src)"
  else
    CDDREC_COMMIT="unknown (no git here; source sha256 $src)"
  fi
  export CDDREC_COMMIT
  cd "$WORK/run" || exit 1  # not the checkout: its cddrec/ would hide the installed package's wings
  local device=cuda gpu_tests bench_args
  gpu_tests=(-m gpu "$root/tests/test_roofline.py" "$root/tests/test_runtime.py" "$root/tests/test_export.py"
             "$root/tests/test_gpu_serving.py")
  bench_args=(--seconds 0.5)
  if [ "$mode" = dry-run ]; then  # CPU backends, small sizes; the GPU area's CPU tests instead of the skipped GPU ones
    device=cpu
    gpu_tests=("$root/tests/test_gpu_serving.py")
    bench_args=(--items 2000 --hidden 64 --steps 8 --batch-sizes 1,256 --parity-batches 1,64 --seconds 0.2
                --requests 20000 --infer-batch 1024 --serve-seconds 1 --serve-concurrency 1,16)
  fi
  { echo "== machine"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -3
    "$PY" - <<'PY'
import importlib, importlib.metadata as md, shutil, sys
print("python", sys.version.split()[0], sys.executable)
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available(),
          torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
except ImportError as e:
    print("torch missing", e)
for m in ("onnx", "onnxruntime", "numpy", "pyarrow", "polars", "starlette", "uvicorn", "orjson", "httptools", "click",
          "tqdm", "yaml", "pytest", "prometheus_client", "uvloop", "cddrec", "cddrec.export", "cddrec.runtime.backends"):
    try:
        mod = importlib.import_module(m); print(m, getattr(mod, "__version__", ""), getattr(mod, "__file__", ""))
    except Exception as e:  # noqa: BLE001
        print(m, "MISSING", type(e).__name__, e)
print("cddrec.backends entry points:", sorted(e.name for e in md.entry_points(group="cddrec.backends")))
print("commands:", {c: shutil.which(c) for c in ("cddrec-infer", "cddrec-bench", "cddrec-serve")})
try:
    import onnxruntime as o; print("onnxruntime providers", o.get_available_providers())
except Exception as e:  # noqa: BLE001
    print("onnxruntime", e)
PY
  } > "$WORK/machine.txt" 2>&1
  cat "$WORK/machine.txt" | tee -a "$OUT/env.txt"

  # 1) the GPU-marked tests (a per-test limit where pytest-timeout is installed, as on the image)
  local per_test=(); "$PY" -c "import pytest_timeout" 2>/dev/null && per_test=(-p timeout --timeout 90)
  local t=$(( $(left) - 250 )); [ "$t" -gt 100 ] && t=100; [ "$t" -lt 30 ] && t=30
  echo "[+$(( $(date +%s) - START ))s] pytest (${t}s at most)"
  timeout "$t" "$PY" -m pytest -v -rfEs -p no:cacheprovider --rootdir "$root" -c "$root/pyproject.toml" "${per_test[@]}" \
    "${gpu_tests[@]}" > "$OUT/pytest.txt" 2>&1
  local test_rc=$?
  echo "pytest rc $test_rc" >> "$OUT/pytest.txt"; tail -n 12 "$OUT/pytest.txt"

  # 2) export, parity, cddrec-bench, cddrec-infer, cddrec-serve on the paper-size random model
  t=$(( $(left) - 15 ))
  echo "[+$(( $(date +%s) - START ))s] gpu_bench (${t}s)"
  timeout $((t + 30)) "$PY" -m cddrec.benchmarks.gpu_bench --out "$OUT" --device "$device" --budget-seconds "$t" \
    "${bench_args[@]}" > "$OUT/gpu_bench.log" 2>&1
  local bench_rc=$?
  echo "gpu_bench rc $bench_rc" >> "$OUT/gpu_bench.log"; tail -n 60 "$OUT/gpu_bench.log"
  echo "[+$(( $(date +%s) - START ))s] done: pytest rc $test_rc, gpu_bench rc $bench_rc"; ls -la "$OUT"
  [ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
}

# ---------------------------------------------------------------------------------------- main
case "$mode" in
  prepare) prepare; exit 0 ;;
  source-hash) source_hash "$PY" | cut -c1-12; exit 0 ;;
esac
if [ "$mode" = device ] && ! command -v nvidia-smi >/dev/null; then
  echo "no GPU here (no nvidia-smi): the device sequence collects the carried parts; use --dry-run on this machine"; exit 1
fi
mkdir -p "$WORK"
OUT=${OUT:-$WORK/out}; mkdir -p "$OUT"
if [ ! -f "$WORK/env.sh" ]; then
  collect
  [ -f "$WORK/manifest.env" ] || { echo "no parts here and nothing installed: run --prepare and carry .gpucarry<i>"; exit 1; }
  install 2>&1 | tee -a "$OUT/env.txt"; [ "${PIPESTATUS[0]}" -eq 0 ] || exit 1
  [ -f "$WORK/env.sh" ] || exit 0  # a part collected, not the last one
fi
# shellcheck disable=SC1091
source "$WORK/env.sh"
refresh_cddrec 2>&1 | tee -a "$OUT/env.txt"
[ "$install_only" = 1 ] && { echo "installed (--install-only): $WORK/env.sh"; exit 0; }
check
