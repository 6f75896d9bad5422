import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cddrec.benchmarks.infer_throughput import tables as infer_tables
from cddrec.benchmarks.latency import bench_table, default_backends, time_backend
from cddrec.benchmarks.quality import PAPER, summarize
from cddrec.benchmarks.record import cell, dirty_commits, record
from cddrec.config import ModelConfig
from cddrec.flops import flops_per_user

SMALL = ModelConfig(num_items=10, hidden_size=8, max_len=4, steps=2, num_heads=2)
NAN_CELL = re.compile(r"\|\s*nan\s*\|", re.IGNORECASE)


def floor_as_a_name(text: str) -> bool:
    """Whether ``text`` calls a figure "floor" (saying that the roofline is "not a floor" is fine)."""
    return "floor" in text.lower().replace("not a floor", "")


def keys(doc) -> set[str]:
    if isinstance(doc, dict):
        return set(doc) | {k for v in doc.values() for k in keys(v)}
    return {k for v in doc for k in keys(v)} if isinstance(doc, list) else set()


RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


class Sleepy:
    def infer(self, feed):
        return {"top_items": np.zeros((len(feed["item_ids"]), 1))}


def test_time_backend_reports_percentiles():
    t = time_backend(Sleepy(), [np.zeros((8, 4), dtype=np.int64)], warmup=1, min_runs=20, min_seconds=0.0)
    assert t.runs == 20 and t.batch == 8
    assert 0 <= t.p50_ms <= t.p90_ms <= t.p99_ms and t.users_per_s > 0


# ------------------------------------------------------------------- cddrec-bench
def bench_result() -> dict:
    roof = {"device": "cpu", "precision": "fp32", "precisions": {"weights": "fp32", "attention": "fp32",
                                                                 "scoring": "fp32"},
            "threads": 1, "peaks_gflops": {"fp32": 100.0}, "users_per_s": 1e6}
    no_roof = {**roof, "precision": "int8+fp32", "precisions": {**roof["precisions"], "weights": "int8"},
               "users_per_s": None, "unavailable": "ValueError: no int8 peak"}
    timing = {"batch": 1, "p50_ms": 1.0, "p90_ms": 2.0, "p99_ms": 3.0, "users_per_s": 1000.0}
    return {"config": {"d": 8, "L": 4, "T": 2, "items": 10, "k": 3, "layers": 1, "threads": 1},
            "flops_per_user": flops_per_user(SMALL), "flops_per_user_plain_reference": flops_per_user(SMALL, plain=True),
            "cpu_fp32_peak_gflops": 100.0, "roofline_users_per_s": 1e6, "cpu_int8": {"vnni": True},
            "results": [{"backend": "ort-cpu", "load_seconds": 0.1, "peak_rss_mb": 10.0, "roofline": roof,
                         "timings": [{**timing, "share_of_roofline": 0.001}]},
                        {"backend": "ort-cpu-int8", "load_seconds": 0.1, "peak_rss_mb": 10.0, "roofline": no_roof,
                         "timings": [{**timing, "share_of_roofline": None}]},
                        {"backend": "trt", "error": "BackendUnavailable: no TensorRT"}]}


def test_record_writes_json_and_table(tmp_path):
    res = bench_result()
    table = bench_table(res)
    assert "| ort-cpu | fp32 | 1 | 1.000 |" in table and "skipped: BackendUnavailable" in table
    assert "share of roofline" in table and not floor_as_a_name(table)
    assert "roofline 1,000,000 users/s (ort-cpu)" in table and "not measured (ValueError: no int8 peak)" in table
    assert not NAN_CELL.search(table)  # no torch timing, no roofline: '-', never nan
    j, m = record("x", res, table, tmp_path, command="cddrec-bench --test")
    doc = json.loads(j.read_text())
    assert doc["command"] == "cddrec-bench --test" and doc["commit"] and doc["machine"]["cores"] >= 1
    assert "cddrec-bench --test" in m.read_text()


def test_record_names_the_commit_an_installed_copy_is_told(tmp_path, monkeypatch):
    """The GPU check runs an installed wheel (no git metadata: its first records said 'unknown'); it
    passes the checkout's commit in CDDREC_COMMIT."""
    monkeypatch.setenv("CDDREC_COMMIT", "b30f5c3abcde")
    j, m = record("x", {}, "table", tmp_path, command="c")
    assert json.loads(j.read_text())["commit"] == "b30f5c3abcde" and "`b30f5c3abcde`" in m.read_text()


def test_missing_values_are_dashes_never_nan():
    assert [cell(None, ".2f"), cell(float("nan"), ",.0f"), cell(1234.5, ",.0f"), cell(0.5, ".0%")] == \
        ["-", "-", "1,234", "50%"]


def test_record_marks_a_dirty_tree(tmp_path):
    meta = {"command": "x", "commit": "abc+dirty", "machine": {"cpu": "c", "cores": 1}, "date": "d"}
    _, m = record("d", {"runs": []}, "table", tmp_path, meta=meta)
    assert "uncommitted changes (`abc+dirty`)" in m.read_text().splitlines()[2]
    _, m = record("c", {"runs": [{"commit": "def+dirty"}]}, "table", tmp_path, meta={**meta, "commit": "abc"})
    assert "`def+dirty`" in m.read_text()  # a run of the record from a dirty tree
    _, m = record("e", {}, "table", tmp_path, meta={**meta, "commit": "abc"})
    assert "uncommitted" not in m.read_text()


def test_default_backends_are_the_runnable_ones_that_read_the_model():
    from cddrec.runtime.backends import backend_class, runnable_backends

    runnable = runnable_backends()
    assert default_backends("random") == runnable and default_backends("m.pt") == runnable
    graph = default_backends("m.onnx")
    assert "ort-cpu" in graph and set(graph) <= set(runnable)
    assert all(backend_class(n).reads == "graph" for n in graph) and "torch" not in graph
    # choosing them loads no torch backend: a serving machine's bench of a graph never imports torch
    probe = subprocess.run([sys.executable, "-c", "import sys; from cddrec.benchmarks.latency import default_backends; "
                            "print(default_backends('m.onnx'), 'torch' in sys.modules)"],
                           capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0 and probe.stdout.strip().endswith("False"), probe.stdout + probe.stderr


def test_bench_of_a_missing_or_bad_graph_is_one_line(tmp_path):
    from click.testing import CliRunner

    from cddrec.app.bench import main

    (tmp_path / "bad.onnx").write_text("not a graph")
    for name in ("missing.onnx", "bad.onnx"):
        r = CliRunner().invoke(main, ["--model", str(tmp_path / name), "-o", str(tmp_path / "out")])
        assert r.exit_code == 1 and f"{name}: ONNX Runtime cannot load it as a graph" in r.output, r.output
    assert not (tmp_path / "out").exists()


def blocked_torch(tmp_path: Path) -> dict:
    """An environment in which ``import torch`` fails, in this process's children and theirs (a
    spawned backend worker too): a package named torch that raises, first on the path."""
    fake = tmp_path / "no-torch" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake.parent), os.environ.get("PYTHONPATH", "")])}


def test_bench_of_a_graph_runs_without_torch(tmp_path, trained_tiny_onnx):
    """A serving machine benchmarks itself: cddrec-bench on a graph imports no torch (the backend
    workers neither), picks the backends that read graphs, and writes ./cddrec-bench."""
    env = blocked_torch(tmp_path)
    assert subprocess.run([sys.executable, "-c", "import torch"], env=env).returncode != 0
    bench = [sys.executable, "-m", "cddrec.app.bench", "--batch-sizes", "1,4", "--min-seconds", "0.05"]
    proc = subprocess.run(bench + ["--model", str(trained_tiny_onnx)], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "cddrec-bench" / "bench.json").read_text())
    assert [r["backend"] for r in doc["results"]] == ["ort-cpu"] and "error" not in doc["results"][0]
    r = doc["results"][0]
    assert r["roofline"]["precision"] == "fp32" and r["roofline"]["users_per_s"] > 0
    assert all(t["share_of_roofline"] > 0 for t in r["timings"]) and doc["roofline_users_per_s"] > 0
    assert {p["precision"] for p in doc["peaks"]} == {"fp32"} and "vnni" in doc["cpu_int8"]
    assert not [k for k in keys(doc) if "floor" in k] and "machine" in doc
    md = (tmp_path / "cddrec-bench" / "bench.md").read_text()
    assert "share of roofline" in md and not floor_as_a_name(md) and not NAN_CELL.search(md)

    proc = subprocess.run(bench + ["--model", "random", "-o", str(tmp_path / "r")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "--model random needs PyTorch (pip install 'cddrec[train]'" in proc.stderr


def test_bench_of_an_int8_graph_is_held_against_the_int8_peak(tmp_path, trained_tiny):
    from cddrec.benchmarks.latency import run_bench
    from cddrec.export.onnx_export import ExportOptions, export_model

    export_model(trained_tiny, tmp_path / "q.onnx", ExportOptions(k=10, int8=True))
    res = run_bench(str(tmp_path / "q.onnx"), ["ort-cpu", "ort-cpu-int8"], [2], threads=1, min_runs=2,
                    min_seconds=0.01, workdir=tmp_path, echo=lambda m: None)
    ort, variant = res["results"]
    assert ort["roofline"]["precisions"] == {"weights": "int8", "attention": "fp32", "scoring": "fp32"}
    assert set(ort["roofline"]["peaks_gflops"]) == {"fp32", "int8"}
    assert "needs the model file" in variant["error"]  # a variant graph is exported from model.pt, never faked


# ------------------------------------------------------------- cddrec-infer throughput
def test_infer_throughput_keeps_ceilings_apart_from_the_whole_command():
    row = {"preset": "tiny", "format": "jsonl", "lines": 1000, "backend": "ort-cpu", "batch_size": 256,
           "wall_seconds": 1.0, "users_per_s": 1000.0, "peak_rss_mb": 100.0, "summary": "served 1000 users",
           "ceiling_engine_users_per_s": None, "ceiling_pipeline_users_per_s": 50_000.0,
           "whole_command_over_engine_ceiling": None}
    text = infer_tables([row])
    whole, ceilings = text.split("Ceilings measured in process")
    assert "| 1,000 |" in whole and "50,000" not in whole and "alone" not in whole
    assert "not comparable" in ceilings and "warm page cache" in ceilings and "same ten ids" in ceilings
    assert "| - | 50,000 | - |" in ceilings and not NAN_CELL.search(text)


# ------------------------------------------------------------------------- quality
def test_quality_summary_leads_with_the_same_budget_baseline():
    metrics = {k: v + 0.01 for k, v in PAPER["Office_Products"].items()}
    metrics["MRR@40"] = metrics.pop("MRR")
    cfg = {"loss": "ce", "lam": 0.0, "denoising": False, "rank_steps": "all", "decoder": True}
    run = {"recipe": "cddrec", "test": {**metrics, "MRR": metrics["MRR@40"] + 0.002, "AvgChange@40": 2.0},
           "train_seconds": 600, "config": cfg}
    better = {**run, "recipe": "sasrec-ce", "config": {**cfg, "decoder": False},
              "test": {k: v + 0.001 for k, v in run["test"].items()}}
    text = summarize("Office_Products", [better, run])
    own, paper = text.index("| cddrec | 1 |"), text.index("| paper CDDRec | - | 0.0271 |")
    assert own < text.index("| sasrec-ce | 1 |") < paper  # our runs first, CDDRec then SASRec-CE, the paper after
    assert "cddrec against sasrec-ce trained the same way (one seed each" in text
    assert "below on R@1, R@5, R@10, N@5, N@10, MRR" in text
    assert "at or above on every metric" not in text
    assert "cddrec: full-catalogue softmax CE at every step; no InfoNCE (lambda 0); no Eq. 4 sampling" in text
    assert "cddrec against the paper's CDDRec: above on R@1" in text
    low = {**run, "test": {**run["test"], "R@1": 0.001}}
    assert "below on R@1" in summarize("Office_Products", [low]).split("paper's CDDRec:")[1]


def test_quality_summary_level_within_the_spread():
    def run(recipe, seed, r10):
        test = {**{k: 0.05 for k in PAPER["Office_Products"]}, "MRR@40": 0.05, "AvgChange@40": 1.0, "R@10": r10}
        return {"recipe": recipe, "seed": seed, "test": test, "train_seconds": 60, "config": {}}

    runs = [run("cddrec", 0, 0.110), run("cddrec", 1, 0.114), run("sasrec-ce", 0, 0.111), run("sasrec-ce", 1, 0.112)]
    text = summarize("Office_Products", runs)
    assert "(2 seeds and 2 seeds; level = within the larger std): level with on R@1, R@5, R@10" in text


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


# ------------------------------------------------------------- the committed results
def result_pairs() -> list[tuple[Path, Path]]:
    return [(md, md.with_suffix(".json")) for md in sorted(RESULTS.glob("*.md"))]


def test_every_result_has_its_json_and_no_nan_cells():
    pairs = result_pairs()
    assert pairs
    assert [md.name for md, js in pairs if not js.exists()] == []
    assert [md.name for md, _ in pairs if NAN_CELL.search(md.read_text())] == []


def test_results_from_dirty_trees_say_so():
    for md, js in result_pairs():
        head = "\n".join(md.read_text().splitlines()[:6])
        dirty = dirty_commits(json.loads(js.read_text()))
        assert ("uncommitted changes" in head) == bool(dirty), md.name


def test_results_name_the_roofline_and_say_when_it_was_recorded_as_floor():
    for md, _ in result_pairs():
        lines = md.read_text().splitlines()
        floor = [ln for ln in lines if floor_as_a_name(ln)]
        assert all(ln.startswith(">") and "named \"floor\" when" in ln.lower() for ln in floor), (md.name, floor)
        if floor:
            assert any("roofline" in ln for ln in lines if not ln.startswith(">")), md.name


def test_arch_refactor_json_is_built_from_its_two_runs():
    doc = json.loads((RESULTS / "arch_refactor.json").read_text())
    runs = {side: json.loads((RESULTS / f"arch_refactor_{side}.json").read_text()) for side in ("before", "after")}
    assert [doc["sources"][s]["commit"] for s in ("before", "after")] == [runs[s]["commit"] for s in ("before", "after")]
    for row in doc["rows"]:
        got = {}
        for side in ("before", "after"):
            r = next(r for r in runs[side]["results"] if r["backend"] == row["backend"])
            got[side] = next(t for t in r["timings"] if t["batch"] == row["batch"])
        assert row["before_users_per_s"] == got["before"]["users_per_s"]
        assert row["after_p50_ms"] == got["after"]["p50_ms"]
        assert row["after_over_before"] == pytest.approx(got["after"]["users_per_s"] / got["before"]["users_per_s"])


def test_metric_value_reads_a_metrics_page_with_prometheus_clients_parser():
    """serve_load.metric_value (the load benchmark's and the server tests' reader of /metrics)."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    from cddrec.benchmarks.serve_load import metric_value

    reg = CollectorRegistry()
    requests = Counter("cddrec_requests", "requests", ["route", "status"], registry=reg)
    requests.labels("/v1/recommend", "200").inc(3)
    requests.labels("/v1/recommend", "400").inc()
    requests.labels("/v2", "200").inc(5)
    sizes = Histogram("cddrec_batch_size", "users", buckets=(1, 8), registry=reg)
    for n in (1, 4, 16):
        sizes.observe(n)
    text = generate_latest(reg).decode()
    assert metric_value(text, "cddrec_requests_total") == 9
    assert metric_value(text, 'cddrec_requests_total{route="/v1/recommend",status="200"}') == 3
    assert metric_value(text, 'cddrec_requests_total{status="200"}') == 8
    assert (metric_value(text, "cddrec_batch_size_sum"), metric_value(text, "cddrec_batch_size_count")) == (21, 3)
    assert metric_value(text, "cddrec_missing") == 0


def test_benchmarks_run_the_console_script_a_user_types(monkeypatch, tmp_path):
    """record.user_command: the script beside this Python, else ``python -m`` its entry point's module (never a
    script of another install on PATH); a name that is no console script of this install is refused."""
    import importlib.metadata
    import sys

    from cddrec.benchmarks import record

    fake_python = tmp_path / "bin" / "python"
    fake_python.parent.mkdir()
    monkeypatch.setattr(sys, "executable", str(fake_python))
    other = tmp_path / "other"
    other.mkdir()
    (other / "cddrec-eval").write_text("#!/bin/sh\n")
    (other / "cddrec-eval").chmod(0o755)
    monkeypatch.setenv("PATH", f"{other}:{os.environ['PATH']}")  # another install's script: not taken
    assert record.user_command("cddrec-eval") == [str(fake_python), "-m", "cddrec.app.evaluate"]  # the entry point's
    (tmp_path / "bin" / "cddrec-eval").write_text("#!/bin/sh\n")
    assert record.user_command("cddrec-eval") == [str(tmp_path / "bin" / "cddrec-eval")]
    (tmp_path / "bin" / "cddrec-eval").unlink()
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kw: [])  # not installed: no guessing
    with pytest.raises(LookupError, match="cddrec-eval is not a console script"):
        record.user_command("cddrec-eval")


def test_instances_benchmark_records_both_layouts(tmp_path, trained_tiny_onnx):
    from click.testing import CliRunner

    from cddrec.benchmarks.instances import main as instances

    r = CliRunner().invoke(instances, ["--graph", str(trained_tiny_onnx), "--cores", "2", "--batch-sizes", "2,8",
                                       "--seconds", "0.05", "--rounds", "2", "-o", str(tmp_path), "--name", "i"])
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "i.json").read_text())
    assert {(row["layout"], row["batch"]) for row in doc["rows"]} == \
        {(lay, b) for lay in ("one run, 2 threads", "2 runs, 1 thread each") for b in (2, 8)}
    assert all(len(row["rounds"]) == 2 and row["median"] > 0 for row in doc["rows"])
    assert doc["baseline"] == "one run, 2 threads, batch 8"
    assert "| 2 runs, 1 thread each | 8 |" in (tmp_path / "i.md").read_text()


def test_infer_instances_benchmark_runs_both_layouts(tmp_path, trained_tiny_onnx):
    from click.testing import CliRunner

    from cddrec.benchmarks.infer_instances import main as infer_instances

    r = CliRunner().invoke(infer_instances, ["--graph", str(trained_tiny_onnx), "--requests", "300", "--cores", "2",
                                             "--rounds", "1", "-o", str(tmp_path), "--name", "ii"])
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "ii.json").read_text())
    assert set(doc["layouts"]) == {"--instances 1 --threads 2", "--instances 2 --threads 1"}
    assert all(v["wall"][0] > 0 and v["served"][0] > 0 for v in doc["layouts"].values()) and doc["ratio_wall"] > 0


def test_serve_load_refuses_what_is_no_server_url_and_a_server_given_twice():
    """``cddrec-bench --serve``: http(s) URLs only (no scheme, another scheme, a bad port: refused at once, the URL
    named), no empty item, no server twice (after the trailing slash, the default port and the host's case)."""
    from cddrec.benchmarks.serve_load import server_url, server_urls

    assert server_urls("http://a:1/,https://[::1]:8443") == ["http://a:1", "https://[::1]:8443"]
    assert server_urls(["http://b:2/prefix/"]) == ["http://b:2/prefix"] and server_url(" http://c ") == "http://c"
    for bad, words in (("localhost:8000", "localhost:8000: not an http(s)://HOST:PORT URL"),
                       ("127.0.0.1:8000", "127.0.0.1:8000: not an http(s)://HOST:PORT URL"),
                       ("ftp://a:21", "ftp://a:21: not an http(s)://HOST:PORT URL"),
                       ("http://", "not an http(s)://HOST:PORT URL"),
                       ("http://a:99999", "http://a:99999: not a server URL"),
                       ("http://a:1/?x=1", "no ?query"),
                       ("http://a:1,http://a:1/", "one server given twice (http://a:1 and http://a:1)"),
                       ("http://A,http://a:80", "one server given twice"),
                       ("https://a,https://a:443/", "one server given twice"),
                       ("http://a:1,", "has an empty item"),
                       (",http://a:1", "has an empty item"),
                       ("", "has an empty item")):
        with pytest.raises(ValueError, match=re.escape(words)):
            server_urls(bad)
    assert server_urls("http://a:1,http://a:2,http://b:1,http://a:1/p") == [
        "http://a:1", "http://a:2", "http://b:1", "http://a:1/p"]  # other ports, hosts or paths: other servers


def test_serve_load_tables_number_from_one_and_list_the_settings():
    """The comparison numbers rounds and servers from 1 (JSON and markdown alike) and has a median p99 column;
    the one-server table lists the server's engine layout and batching settings."""
    from cddrec.benchmarks.serve_load import compare_summary, compare_table, serve_table, server_settings

    info = {"name": "m", "version": "3", "K": 10, "L": 20, "num_items": 100, "instances": 2, "instance_kind": "KIND_CPU",
            "threads_per_instance": 1, "max_wait_ms": 2.0, "idle_poll_ms": 1.0}
    results = [{"round": n, "server": s, "route": "v2", "concurrency": 8, "requests_per_s": 100.0 * s + n,
                "p50_ms": 1.0 * s, "p99_ms": 2.0 * s + n, "errors": {}} for n in (1, 2, 3) for s in (1, 2)]
    summary = compare_summary(results, 2)
    assert [d["server"] for d in summary] == [1, 2]
    assert summary[1]["median_p99_ms"] == 6.0 and summary[1]["p99_minus_first_ms"] == 2.0
    assert summary[1]["throughput_vs_first"] == pytest.approx(np.median([(200 + n) / (100 + n) for n in (1, 2, 3)]))
    table = compare_table({"server_models": [info, info], "rounds": 3, "seconds": 1.0, "urls": ["http://a", "http://b"],
                           "settings": [f"version 3, {server_settings(info)}"] * 2, "summary": summary})
    assert "| median p99 ms | p99 - server 1 ms |" in table
    assert "| v2 | 8 | 1 | 101 / 102 / 103 | 102 | - |" in table and "| 6.00 | +2.00 | 0 |" in table
    assert "- server 2: http://b (version 3, 2 instance(s) x 1 thread(s), max-wait 2 ms, idle-poll 1 ms)" in table
    one = serve_table({"url": "http://a", "server_model": info, "seconds": 1.0, "results": []})
    assert "server settings: 2 instance(s) x 1 thread(s), max-wait 2 ms, idle-poll 1 ms" in one.splitlines()
