"""Data files and evaluation as they are: no silent filter, BOMs, unknown items counted, honest top-k (issue 13)."""

import json

import pytest
from click.testing import CliRunner

from cddrec.app.evaluate import main as eval_main
from cddrec.app.train import main as train_main
from cddrec.config import ModelConfig, from_flat
from cddrec.data import from_keys, load_data
from cddrec.training import train

TINY = ["--hidden-size", "16", "--num-heads", "2", "--max-len", "8", "--steps", "2", "--batch-size", "16",
        "--epochs", "1", "--num-threads", "1", "--quiet"]


def test_bom_is_not_data(tmp_path):
    txt = tmp_path / "s.txt"
    txt.write_bytes(b"\xef\xbb\xbfu1 a b c\nu2 a b c\n")
    d = load_data(txt)
    assert d.users == ["u1", "u2"] and d.items.keys == ["a", "b", "c"]
    csv = tmp_path / "log.csv"
    csv.write_bytes(b"\xef\xbb\xbfuser,item,timestamp\n" + b"".join(
        f"u{u},i{i},{i}\n".encode() for u in range(5) for i in range(5)))
    d = load_data(csv)
    assert len(d.users) == 5 and d.users[0] == "u0"


def test_kcore_only_for_logs_unless_given(tmp_path):
    txt = tmp_path / "s.txt"
    txt.write_text("u1 a b c\nu2 a b d\nu3 a b c e\n")  # not 5-core: the old default dropped everything
    d = load_data(txt)
    assert len(d.users) == 3 and d.num_interactions == 10 and d.filtered["kcore"] == 1
    assert d.filtered["users_removed"] == 0
    d = load_data(txt, kcore=2)  # explicit: filters, and says what it removed
    assert d.filtered == {"kcore": 2, "users_removed": 0, "items_removed": 2, "interactions_removed": 2,
                          "users_under_3_items": 1}
    csv = tmp_path / "log.csv"
    rows = [f"u{u},i{i},{i}" for u in range(6) for i in range(6)] + ["u9,rare,1", "u9,i1,2"]
    csv.write_text("user,item,timestamp\n" + "\n".join(rows) + "\n")
    d = load_data(csv)
    assert d.filtered["kcore"] == 5 and d.filtered["users_removed"] == 1 and d.filtered["items_removed"] == 1


def test_train_prints_what_the_filter_removed(tmp_path, tiny_data_file):
    r = CliRunner().invoke(train_main, [str(tiny_data_file), "--out", str(tmp_path / "m.pt"), *TINY, "--kcore", "6"])
    assert r.exit_code == 0, r.output
    assert "k-core 6 removed" in r.output and "interactions" in r.output
    r = CliRunner().invoke(train_main, [str(tiny_data_file), "--out", str(tmp_path / "m.pt"), *TINY])
    assert "no k-core filter" in r.output


def test_eval_never_filters_and_counts_unknowns(tmp_path, trained_tiny, tiny_data_file):
    lines = tiny_data_file.read_text().splitlines()[:20]
    extra = ["short 1 2",  # fewer than 3 items: skipped, counted
             "unk_target 1 2 3 zzz",  # target unknown to the model: a miss, counted
             "unk_hist 1 yyy 2 3"]  # an unknown history item: dropped, counted
    data = tmp_path / "eval.txt"
    data.write_text("\n".join(lines + extra) + "\n")
    r = CliRunner().invoke(eval_main, [str(trained_tiny), str(data), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["users"] == 22
    assert out["data"] == {"users_in_file": 23, "users_evaluated": 22, "users_under_3_items": 1,
                           "unknown_history_items_dropped": 1, "unknown_targets_counted_as_misses": 1}
    only_unknown = tmp_path / "unknown.txt"
    only_unknown.write_text("a 1 2 3 zzz\nb 4 5 6 www\n")
    out = json.loads(CliRunner().invoke(eval_main, [str(trained_tiny), str(only_unknown), "--json"]).stdout)
    assert out["users"] == 2 and out["R@20"] == 0 and out["MRR"] == 0 and out["MRR@40"] == 0


def test_eval_rejects_bad_numbers_and_empty_data(tmp_path, trained_tiny, tiny_data_file):
    runner = CliRunner()
    for opt in (["--batch-size", "0"], ["--batch-size", "-1"], ["--topk", "0"], ["--topk", "-3"]):
        r = runner.invoke(eval_main, [str(trained_tiny), str(tiny_data_file), "--json", *opt,
                                      "--save-topk", str(tmp_path / "t.jsonl")])
        assert r.exit_code == 2, (opt, r.output)
    short = tmp_path / "short.txt"
    short.write_text("a 1 2\nb 3\n")
    r = runner.invoke(eval_main, [str(trained_tiny), str(short), "--json"])
    assert r.exit_code == 1 and "nothing to evaluate" in r.output and "NaN" not in r.output


def test_save_topk_never_writes_masked_entries(tmp_path):
    # 6 items, the default --topk 40: each list holds exactly the items the user has not seen
    seqs = [[str(1 + (u + j) % 6) for j in range(3 + u % 2)] for u in range(40)]
    data = from_keys([f"u{u}" for u in range(40)], seqs, min_len=3)
    model = tmp_path / "six.pt"
    cfgs = from_flat(dict(hidden_size=8, num_heads=2, max_len=4, steps=2, batch_size=16, epochs=1, threads=1))
    train(*cfgs, data, model, progress=False, log=lambda m: None)
    path = tmp_path / "six.txt"
    path.write_text("".join(f"u{u} {' '.join(s)}\n" for u, s in enumerate(seqs)))
    top = tmp_path / "top.jsonl"
    r = CliRunner().invoke(eval_main, [str(model), str(path), "--save-topk", str(top)])
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in top.read_text().splitlines()]
    assert len(rows) == 40
    for row, s in zip(rows, seqs):
        unseen = {int(x) for x in set("123456") - set(s[:-1])}
        assert sorted(row["items"]) == sorted(unseen), (row, s)
        assert all(isinstance(x, float) and x > -1e30 for x in row["scores"])


@pytest.mark.parametrize("bad", [b"", b"hello, I am not a model\n", bytes(range(256)) * 8])
def test_bad_model_files_one_line(tmp_path, tiny_data_file, bad):
    model = tmp_path / "model.pt"
    model.write_bytes(bad)
    r = CliRunner().invoke(eval_main, [str(model), str(tiny_data_file)])
    assert r.exit_code == 1 and r.exception.__class__ is SystemExit, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and str(model) in lines[0] and "Traceback" not in r.output, r.output


def test_unsafe_pickle_refused_without_advice(tmp_path, tiny_data_file):
    import torch

    model = tmp_path / "evil.pt"
    torch.save({"format": "cddrec", "x": ModelConfig()}, model)  # a Python object beyond tensors
    r = CliRunner().invoke(eval_main, [str(model), str(tiny_data_file)])
    assert r.exit_code == 1
    assert "refused" in r.output and "may be unsafe" in r.output and str(model) in r.output
    assert "weights_only" not in r.output and "Re-running" not in r.output
