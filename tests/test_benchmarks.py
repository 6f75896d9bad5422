import json

import numpy as np

from cddrec.benchmarks.latency import bench_table, time_backend
from cddrec.benchmarks.quality import PAPER, summarize
from cddrec.benchmarks.record import record
from cddrec.config import ModelConfig
from cddrec.model import flops_per_user

SMALL = ModelConfig(num_items=10, hidden_size=8, max_len=4, steps=2, num_heads=2)


class Sleepy:
    def infer(self, feed):
        return {"top_items": np.zeros((len(feed["item_ids"]), 1))}


def test_time_backend_reports_percentiles():
    t = time_backend(Sleepy(), [np.zeros((8, 4), dtype=np.int64)], warmup=1, min_runs=20, min_seconds=0.0)
    assert t.runs == 20 and t.batch == 8
    assert 0 <= t.p50_ms <= t.p90_ms <= t.p99_ms and t.users_per_s > 0


def test_record_writes_json_and_table(tmp_path):
    res = {"config": {"d": 8, "L": 4, "T": 2, "items": 10, "k": 3, "layers": 1, "threads": 1},
           "flops_per_user": flops_per_user(SMALL), "flops_per_user_plain_reference": flops_per_user(SMALL, plain=True),
           "matmul_peak_gflops": 100.0, "floor_users_per_s": 1e6,
           "results": [{"backend": "ort-cpu", "load_seconds": 0.1, "peak_rss_mb": 10.0,
                        "timings": [{"batch": 1, "p50_ms": 1.0, "p90_ms": 2.0, "p99_ms": 3.0, "users_per_s": 1000.0,
                                     "share_of_floor": 0.001}]},
                       {"backend": "trt", "error": "BackendUnavailable: no TensorRT"}]}
    table = bench_table(res)
    assert "| ort-cpu | 1 | 1.000 |" in table and "skipped: BackendUnavailable" in table
    j, m = record("x", res, table, tmp_path, command="cddrec-bench --test")
    doc = json.loads(j.read_text())
    assert doc["command"] == "cddrec-bench --test" and doc["commit"] and doc["machine"]["cores"] >= 1
    assert "cddrec-bench --test" in m.read_text()


def test_quality_summary_compares_with_paper():
    metrics = {k: v + 0.01 for k, v in PAPER["Office_Products"].items()}
    metrics["MRR@40"] = metrics.pop("MRR")
    run = {"recipe": "cddrec", "test": {**metrics, "MRR": metrics["MRR@40"] + 0.002, "AvgChange@40": 2.0},
           "train_seconds": 600}
    text = summarize("Office_Products", [run, {**run, "recipe": "sasrec-ce"}])
    assert "| paper CDDRec | - | 0.0271 |" in text and "at or above on every metric" in text
    low = {**run, "test": {**run["test"], "R@1": 0.001}}
    assert "below the paper on R@1" in summarize("Office_Products", [low])


def test_quality_report_only_rewrites_the_table_and_keeps_provenance(tmp_path):
    from click.testing import CliRunner

    from cddrec.benchmarks.quality import main

    stage = {"stage": 1, "step": 3, "R@10": 0.2, "N@10": 0.1, "MRR@40": 0.05, "AvgChange@40": 1.5}
    test = {**{k: 0.5 for k in PAPER["Office_Products"]}, "MRR@40": 0.5, "AvgChange@40": 2.0}
    run = {"recipe": "cddrec", "seed": 0, "test": test, "train_seconds": 60, "stages": [stage] * 4,
           "command": "python -m cddrec.benchmarks.quality --dataset Office_Products"}
    record("quality_Office_Products", {"dataset": "Office_Products", "runs": [run]}, "old table", tmp_path,
           command="the original command")
    r = CliRunner().invoke(main, ["--dataset", "Office_Products", "--report-only", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    md = (tmp_path / "quality_Office_Products.md").read_text()
    assert "old table" not in md and "the original command" in md
    assert "| cddrec | 1 | 0.2000 | 0.1000 | 0.0500 | 1.50 |" in md and "--dataset Office_Products`" in md
    r = CliRunner().invoke(main, ["--dataset", "Beauty", "--report-only", "--out", str(tmp_path)])
    assert r.exit_code != 0 and "no recorded runs" in r.output


def test_ort_profile_shares_per_op_type(tmp_path, trained_tiny_onnx, tiny_cfg):
    from cddrec.benchmarks.ort_profile import profile_graph

    res = profile_graph(trained_tiny_onnx, batch=4, runs=2, items=tiny_cfg.num_items, L=tiny_cfg.max_len, threads=1,
                        workdir=tmp_path)
    ops = {o["op"]: o for o in res["ops"]}
    assert abs(sum(o["share"] for o in res["ops"]) - 1) < 1e-6 and res["kernel_ms_per_run"] > 0
    assert "TopK" in ops and ("MatMul" in ops or "FusedMatMul" in ops or "Gemm" in ops)
