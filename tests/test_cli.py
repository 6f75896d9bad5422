import json
import math

import yaml
from click.testing import CliRunner

from cddrec.app.evaluate import main as eval_main
from cddrec.app.train import main as train_main

TINY = ["--hidden-size", "16", "--num-heads", "2", "--max-len", "8", "--steps", "4", "--batch-size", "16",
        "--epochs", "2", "--num-threads", "1", "--quiet"]


def test_train_then_eval(tmp_path, tiny_data_file):
    runner = CliRunner()
    model = tmp_path / "model.pt"
    r = runner.invoke(train_main, [str(tiny_data_file), "--out", str(model), *TINY,
                                   "--summary-json", str(tmp_path / "summary.json")])
    assert r.exit_code == 0, r.output
    assert model.exists() and "best epoch" in r.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["model_config"]["steps"] == 4 and summary["epochs_run"] == 2
    assert summary["train_config"]["batch_size"] == 16 and summary["run_config"]["threads"] == 1

    topk = tmp_path / "topk.jsonl"
    r = runner.invoke(eval_main, [str(model), str(tiny_data_file), "--json", "--save-topk", str(topk),
                                  "--topk", "5", "--stages"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["split"] == "test" and out["dataset"] == "tiny"
    for k in ("R@1", "R@5", "R@10", "R@20", "N@5", "N@10", "N@20", "MRR", "MRR@40"):
        assert 0 <= out[k] <= 1
    # the metrics' own order: recall grows with K, NDCG too, and neither can exceed the other's bound
    assert out["R@1"] <= out["R@5"] <= out["R@10"] <= out["R@20"] and out["N@5"] <= out["N@10"] <= out["N@20"]
    assert out["N@10"] <= out["R@10"] and out["MRR@40"] <= out["MRR"] and out["R@1"] <= out["MRR"]
    assert math.isfinite(out["AvgChange@40"]) and out["AvgChange@40"] >= 0
    assert len(out["stages"]) == 4
    lines = [json.loads(x) for x in topk.read_text().splitlines()]
    assert len(lines) == out["users"] and len(lines[0]["items"]) == 5
    assert isinstance(lines[0]["items"][0], int)  # original integer keys come back as ints

    r = runner.invoke(eval_main, [str(model), str(tiny_data_file), "--split", "valid"])
    assert r.exit_code == 0 and "| R@1 |" in r.output


def test_config_file_and_flag_precedence(tmp_path, tiny_data_file):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"hidden-size": 8, "num_heads": 2, "steps": 3, "epochs": 1}))
    out = tmp_path / "m.pt"
    r = CliRunner().invoke(train_main, [str(tiny_data_file), "-o", str(out), "--config", str(cfg), "--steps", "2",
                                        "--max-len", "8", "--batch-size", "16", "--quiet"])
    assert r.exit_code == 0, r.output
    import torch

    saved = torch.load(out, weights_only=True)
    assert saved["model_config"]["hidden_size"] == 8 and saved["model_config"]["steps"] == 2
    assert saved["run_config"]["epochs"] == 1 and saved["train_config"]["batch_size"] == 16


def test_clear_errors(tmp_path, tiny_data_file):
    runner = CliRunner()
    bad = tmp_path / "bad.txt"
    bad.write_text("u1 1 2 3\nlonely\n")
    r = runner.invoke(train_main, [str(bad), "-o", str(tmp_path / "m.pt"), *TINY])
    assert r.exit_code == 1 and "bad.txt:2: expected 'user item" in r.output
    assert not (tmp_path / "m.pt").exists()
    r = runner.invoke(eval_main, [str(tmp_path / "missing.pt"), str(tiny_data_file)])
    assert r.exit_code == 1 and "no such model file" in r.output
    r = runner.invoke(train_main, [str(tiny_data_file), "--hidden-size", "10", "--num-heads", "4"])
    assert r.exit_code == 1 and "multiple of num_heads" in r.output
    cfg = tmp_path / "c.json"
    cfg.write_text('{"hidden_size": 8, "bogus": 1}')
    r = runner.invoke(train_main, [str(tiny_data_file), "--config", str(cfg)])
    assert r.exit_code == 1 and "unknown config keys: bogus" in r.output


def test_end_to_end_train_export_infer(tmp_path, tiny_data, tiny_data_file):
    from cddrec.app.export import main as export_main
    from cddrec.app.infer import main as infer_main

    runner = CliRunner()
    model, graph = tmp_path / "model.pt", tmp_path / "model.onnx"
    r = runner.invoke(train_main, [str(tiny_data_file), "-o", str(model), *TINY])
    assert r.exit_code == 0, r.output
    r = runner.invoke(export_main, [str(model), "-o", str(graph), "--k", "5"])
    assert r.exit_code == 0, r.output
    assert "validated against PyTorch" in r.output and graph.exists()
    req = tmp_path / "req.jsonl"
    users = list(zip(tiny_data.users, tiny_data.sequences))[:20]
    req.write_text("".join(json.dumps({"user": u, "history": tiny_data.items.decode(s[:-1].tolist())}) + "\n"
                           for u, s in users))
    out = tmp_path / "recs.jsonl"
    r = runner.invoke(infer_main, ["--model", str(graph), "--batch", str(req), "-o", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "served 20 users" in r.output
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["user"] for x in recs] == [u for u, _ in users]
    for x, (_, s) in zip(recs, users):
        assert len(x["items"]) == 5 and not set(x["items"]) & set(tiny_data.items.decode(s[:-1].tolist()))
