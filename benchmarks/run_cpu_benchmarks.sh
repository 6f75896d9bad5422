#!/usr/bin/env bash
# Every CPU benchmark of the issues, in one go, on an otherwise idle machine (~30 min on 2 cores).
# Results land in benchmarks/results/ (JSON + markdown, with command, machine and commit).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR=${DATA_DIR:-../shared/data}
python3 -m cddrec.benchmarks.train_speed --data-dir "$DATA_DIR" --epochs 2
python3 -m cddrec.benchmarks.export_scaling --steps 5,20,50 --optimize
# each backend against its roofline (best case: measured matmul peak at its graph's precision / FLOPs per user)
cddrec-bench --model random --items 12101 --backends torch,torch-fast,torch-compile,ort-cpu,ort-cpu-int8 \
    --batch-sizes 1,8,64,256,1024 --min-seconds 2 --catalogue-sizes 10000,100000,1000000 \
    --catalogue-backends ort-cpu,torch-fast --catalogue-batch 64 --name bench_cpu -o benchmarks/results
python3 -m cddrec.benchmarks.infer_throughput --lines 1000000
