import json

import numpy as np
import pytest

from cddrec.batches import TrainBatches
from cddrec.data import eval_split, load_data, training_windows
from cddrec.errors import DataError
from cddrec.readers import kcore_filter, read_interaction_table
from cddrec.sampler import NegativeSampler
from cddrec.synthetic import make_synthetic
from cddrec.transforms import augment
from cddrec.vocab import Vocab


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_remap_never_uses_raw_ids_as_rows(tmp_path):
    p = write(tmp_path, "d.txt", "u1 0 5 7\nu2 5 0 9\nu3 7 9 0 5\n")
    d = load_data(p, kcore=1)
    assert d.items.keys == ["0", "5", "7", "9"]
    assert d.items.key_type == "int"
    assert all(s.min() >= 1 and s.max() <= d.num_items for s in d.sequences)
    assert d.items.id(0) == 1 and d.items.key(1) == 0  # raw 0 -> row 1 and back to int 0
    assert d.sequences[0].tolist() == [1, 2, 3]
    assert Vocab.from_dict(json.loads(json.dumps(d.items.to_dict()))).decode([4, 1]) == [9, 0]


def test_string_keys_stay_strings(tmp_path):
    p = write(tmp_path, "d.txt", "a x y z\nb y 007 x\n")
    d = load_data(p, kcore=1)
    assert d.items.key_type == "str"
    assert d.items.decode([1, 3]) == ["x", "z"]
    assert d.items.id("007") == 4 and d.items.id("missing") == 0


@pytest.mark.parametrize("text,problem", [
    ("u1 1 2 3\nu2\n", ":2: expected 'user item"),
    ("u1 1 2 3\nu1 4 5 6\n", ":2: user 'u1' appears again (first on line 1)"),
])
def test_malformed_sequence_lines_name_file_and_line(tmp_path, text, problem):
    p = write(tmp_path, "bad.txt", text)
    with pytest.raises(DataError) as e:
        load_data(p, kcore=1)
    assert str(p) in str(e.value) and problem in str(e.value)


def test_non_utf8_and_missing_files(tmp_path):
    p = tmp_path / "bin.txt"
    p.write_bytes(b"u1 1 2 3\nu2 \xff\xfe 1\n")
    with pytest.raises(DataError, match=r"bin.txt:2: not UTF-8"):
        load_data(p, kcore=1)
    with pytest.raises(DataError, match="no such file"):
        load_data(tmp_path / "nope.txt")
    with pytest.raises(DataError, match="no sequences"):
        load_data(write(tmp_path, "empty.txt", "\n\n"))


def test_csv_log_stable_sort_by_time(tmp_path):
    p = write(tmp_path, "log.csv", "user,item,timestamp\n"
              "a,x,5\na,y,1\nb,x,2\na,z,5\nb,w,1\na,q,3\nb,z,2\n")
    users, seqs = read_interaction_table(p)
    assert users == ["a", "b"]
    assert seqs[0] == ["y", "q", "x", "z"]  # 1, 3, 5, 5 (x before z: file order on ties)
    assert seqs[1] == ["w", "x", "z"]


def test_tsv_custom_columns_and_errors(tmp_path):
    p = write(tmp_path, "log.tsv", "uid\tiid\tts\n1\t10\t3\n1\t11\t2\n1\t12\t1\n")
    d = load_data(p, kcore=1, user_col="uid", item_col="iid", time_col="ts")
    assert d.items.decode(d.sequences[0].tolist()) == [12, 11, 10]
    with pytest.raises(DataError, match=r"log.tsv:1: missing column\(s\) \['user', 'item', 'timestamp'\]"):
        load_data(p, kcore=1)
    bad = write(tmp_path, "bad.csv", "user,item,timestamp\na,x,1\na,y,soon\n")
    with pytest.raises(DataError, match=r"bad.csv:3: column 'timestamp' must be a number"):
        load_data(bad, kcore=1)
    short = write(tmp_path, "short.csv", "user,item,timestamp\na,x,1\na,y\n")
    with pytest.raises(DataError, match=r"short.csv:3: expected 3 fields"):
        load_data(short, kcore=1)


def test_parquet_log(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    p = tmp_path / "log.parquet"
    pq.write_table(pa.table({"user": ["a", "a", "a", "b", "b", "b"], "item": [3, 1, 2, 1, 2, 3],
                             "timestamp": [30, 10, 20, 1, 2, 3]}), p)
    d = load_data(p, kcore=1)
    assert [d.items.decode(s.tolist()) for s in d.sequences] == [[1, 2, 3], [1, 2, 3]]


def test_kcore_is_iterative():
    users = ["a", "b", "c"]
    seqs = [["x", "y", "z"], ["x", "y"], ["x", "w"]]
    # k=2: w (1) goes, then c has 1 item and goes, then x has 2, y 2, z 1 -> z goes
    u, s = kcore_filter(users, seqs, 2)
    assert u == ["a", "b"] and s == [["x", "y"], ["x", "y"]]


def test_leave_one_out_split(tiny_data):
    L = 8
    test = eval_split(tiny_data, "test", L)
    valid = eval_split(tiny_data, "valid", L)
    for i, u in enumerate(test.users[:20]):
        s = tiny_data.sequences[u]
        assert test.targets[i] == s[-1] and valid.targets[i] == s[-2]
        h = test.histories[i]
        assert h[h > 0].tolist() == s[:-1][-L:].tolist()
        items = test.seen(np.array([i]))[0]
        assert sorted(items[items > 0].tolist()) == sorted(s[:-1].tolist())  # full history, not only last L


def test_training_windows_cover_every_prefix_position_once(tiny_data):
    L = 4  # shorter than most sequences, so long prefixes are cut into several windows
    windows, owners = training_windows(tiny_data, L)
    assert windows.shape[1] == L + 1
    for u, s in enumerate(tiny_data.sequences):
        prefix = s[:-2]
        got = []
        for w in windows[owners == u]:
            targets = np.where(w[:-1] > 0, w[1:], 0)
            got += targets[targets > 0].tolist()
        # every item of the training prefix but the first is a target exactly once
        assert sorted(got) == sorted(prefix[1:].tolist())
        # each window is a contiguous slice of the training prefix: the validation and test items
        # (the last two positions) never enter a window, as input or as target
        for w in windows[owners == u]:
            items = w[w > 0].tolist()
            starts = [i for i in range(len(prefix) - len(items) + 1) if prefix[i:i + len(items)].tolist() == items]
            assert starts, (u, items)


def test_negatives_never_own_items(tiny_data):
    sampler = NegativeSampler(tiny_data.sequences, tiny_data.num_items)
    users = np.arange(len(tiny_data.sequences))
    neg = sampler.sample(users, (len(users), 30), np.random.default_rng(0))
    assert neg.min() >= 1 and neg.max() <= tiny_data.num_items
    for u in users:
        assert not set(neg[u].tolist()) & set(tiny_data.sequences[u].tolist())


def test_augmentations_draw_all_three_kinds():
    rng = np.random.default_rng(0)
    L, mask_id = 10, 99
    x = np.zeros((300, L), dtype=np.int64)
    x[:, :] = np.arange(1, L + 1)
    out = augment(x, mask_id, rng)
    kinds = set()
    for row in out:
        real = row[row > 0]
        if (real == mask_id).any():
            assert (real == mask_id).sum() == 3 and len(real) == L
            kinds.add("mask")
        elif len(real) < L:
            assert len(real) == 6 and np.all(np.diff(real) == 1)  # contiguous crop
            kinds.add("crop")
        else:
            assert sorted(real.tolist()) == list(range(1, L + 1))
            kinds.add("reorder")
    assert kinds == {"mask", "crop", "reorder"}


def test_batches_shapes_and_targets(tiny_data):
    tb = TrainBatches(tiny_data, 8, 16, seed=0)
    b = next(iter(tb))
    assert set(b) == {"input_ids", "targets", "negatives", "aug_ids"}
    assert all(v.shape == (16, 8) for v in b.values())
    inputs, targets, negs = b["input_ids"], b["targets"], b["negatives"]
    assert ((targets > 0) <= (inputs > 0)).all()  # a target always has a history
    assert ((negs > 0) == (targets > 0)).all()
    assert (inputs[:, -1] > 0).all()  # left padding: the most recent item is last


def test_synthetic_is_seeded_and_has_key_zero():
    a, b = make_synthetic(num_users=50, num_items=30, seed=1), make_synthetic(num_users=50, num_items=30, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a.sequences, b.sequences))
    assert a.fingerprint() == b.fingerprint()
    assert a.items.id(0) > 0
    c = make_synthetic(num_users=50, num_items=30, seed=2)
    assert c.fingerprint() != a.fingerprint()


@pytest.mark.parametrize("name,users,items,interactions", [
    ("Office_Products", 4905, 2420, 53258),
    ("Beauty", 22363, 12101, 198502),
    ("Tools_and_Home_Improvement", 16638, 10217, 134476),
    ("Toys_and_Games", 19412, 11924, 167597),
])
def test_amazon_datasets_match_paper_table1(data_dir, name, users, items, interactions):
    d = load_data(data_dir / f"{name}.txt")
    assert d.stats()["users"] == users and d.num_items == items and d.num_interactions == interactions
    if name in ("Office_Products", "Tools_and_Home_Improvement"):
        assert "0" in d.items.index and d.items.id(0) >= 1  # raw item 0 is a key, not padding
