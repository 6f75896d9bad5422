"""The serving codec's shared pieces: the key lookup against the vocabulary's dict on random keys, and
the one request rule as cddrec-infer's lines, the server's bodies and Recommender histories see it."""

import json

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cddrec.runtime import codec
from cddrec.runtime.codec import KeyMapper, encode_histories, history_problem, request_problem
from cddrec.runtime.requests import BadLine, parse_line
from cddrec.vocab import Vocab

INT64 = st.integers(-(2**63), 2**63 - 1)


def _by_dict(vocab: Vocab, values) -> list[int]:
    return [vocab.index.get(str(v), 0) for v in values]  # Vocab.index: key -> id, 1-based


@settings(max_examples=60, deadline=None)
@given(base=st.integers(-(2**40), 2**40), keys=st.lists(st.integers(0, 3000), min_size=1, max_size=60, unique=True),
       extra=st.lists(INT64, max_size=20), seed=st.integers(0, 2**32 - 1))
def test_dense_table_agrees_with_the_dict_on_fresh_keys(base, keys, extra, seed):
    """Integer keys (dense: the lookup table) probed with known, unknown, negative, huge keys, and the
    same keys as strings, with non-ASCII digits, signs, zeros and spaces (never an integer key)."""
    vocab = Vocab.build(str(base + k) for k in keys)
    mapper = KeyMapper(vocab)
    assert mapper.lut is not None
    g = np.random.default_rng(seed)
    near = [base + int(x) for x in g.integers(-50, 3100, size=100)]
    probe = [p for p in near + extra + [2**63 - 1, -(2**63), 0, -1, base - 1] if -(2**63) <= p < 2**63]
    got = mapper.ids(pa.array(probe, pa.int64()))
    assert got.tolist() == _by_dict(vocab, probe)
    odd = [str(p) for p in probe[:20]] + ["٣", "١٢", "１２", "+" + str(base + keys[0]), "0" + str(abs(base + keys[0])),
                                          f" {base + keys[0]}", "-0", "", str(2**64)]
    assert mapper.ids(pa.array(odd, pa.string())).tolist() == _by_dict(vocab, odd)


@settings(max_examples=40, deadline=None)
@given(keys=st.lists(INT64, min_size=1, max_size=40, unique=True), probe=st.lists(INT64, max_size=40))
def test_sparse_int_keys_agree_with_the_dict(keys, probe):
    vocab = Vocab.build(str(k) for k in keys)
    mapper = KeyMapper(vocab)
    probe = probe + keys[:5]
    assert mapper.ids(pa.array(probe, pa.int64())).tolist() == _by_dict(vocab, probe)


@pytest.mark.parametrize("small", [0, 4096])  # every lookup through the hash table / through the dict
def test_string_keys_agree_with_the_dict(small, monkeypatch):
    monkeypatch.setattr(KeyMapper, "SMALL", small)
    vocab = Vocab.build(["a", "B0", "17", "é", "٣"])
    probe = ["a", "b0", "17", "é", "٣", "3", "", "a "]
    assert KeyMapper(vocab).ids(pa.array(probe, pa.string())).tolist() == _by_dict(vocab, probe)
    ints = KeyMapper(Vocab.build(["5", "17", "-3"]))  # an int vocabulary asked with string keys
    probe = ["17", "017", "-3", "5 ", "x"]
    assert ints.ids(pa.array(probe, pa.string())).tolist() == [2, 0, 3, 0, 0]


BAD_REQUESTS = [
    ([1], "expected a JSON object, got list"),
    ({"history": []}, "missing field 'user'"),
    ({"user": True, "history": []}, "field 'user' must be a string or integer, got bool"),
    ({"user": None, "history": []}, "field 'user' must be a string or integer, got NoneType"),
    ({"user": 2**64, "history": []}, "field 'user' integer 18446744073709551616 does not fit 64 bits"),
    ({"user": "u"}, "missing field 'history'"),
    ({"user": "u", "history": "abc"}, "field 'history' must be a list of item keys, got str"),
    ({"user": "u", "history": [1, 1.5]}, "field 'history' entry 1 must be a string or integer, got float"),
    ({"user": "u", "history": ["a", ["b"]]}, "field 'history' entry 1 must be a string or integer, got list"),
]


@pytest.mark.parametrize("obj,reason", BAD_REQUESTS)
def test_a_request_line_is_bad_for_the_one_rule(obj, reason):
    assert request_problem(obj) == reason
    got = parse_line(json.dumps(obj), 7)
    assert isinstance(got, BadLine) and got.line == 7 and got.reason == reason


def test_the_server_and_recommend_use_the_same_rule():
    from cddrec.runtime.server.keys import MAX_KEY_CHARS, _one
    from cddrec.runtime.server.protocol import ProtocolError

    for obj, reason in BAD_REQUESTS:
        if "user" in reason and "history" not in reason:
            if "missing" in reason or obj.get("user", 0) is None:
                continue  # a body's user is optional: absent or null
        with pytest.raises(ProtocolError) as e:
            _one(obj, "request 3: ", contract=None)
        assert str(e.value).endswith("request 3: " + reason), (str(e.value), reason)
    assert _one({"history": [1, "a"]}, "", contract=None) == (None, [1, "a"], None)
    assert request_problem({"user": "x" * (MAX_KEY_CHARS + 1), "history": []}, max_key_chars=MAX_KEY_CHARS) \
        == f"field 'user' has {MAX_KEY_CHARS + 1} characters; at most {MAX_KEY_CHARS}"
    mapper = KeyMapper(Vocab.build(["1", "2"]))
    assert history_problem((1, "a")) is None
    for hist in ["12", 5, [1, True]]:
        with pytest.raises(ValueError) as e:
            encode_histories([[1], hist], mapper)
        assert str(e.value) == f"history 1 {history_problem(hist)}"


def test_what_every_output_says():
    assert [codec.source_of(False), codec.source_of(np.bool_(True))] == list(codec.SOURCES) == ["model", "popularity"]
    s = np.array([0.1234567, -1.0000005, 308.0, 3.1415927], np.float32)  # float32 -1.0000005 is -1.00000048
    assert codec.SCORE_DECIMALS == 6 and codec.round_scores(s).tolist() == [0.123457, -1.0, 308.0, 3.141593]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(INT64.map(str), st.integers(-(2**70), 2**70).map(str), st.text(max_size=6),
                          st.text(alphabet="-0123456789٣１+ ", max_size=21)), max_size=40))
def test_int_users_vectorized_as_the_key_rule(keys):
    """--keys int on string users: the vectorized check is ``is_int_key``, key by key."""
    from cddrec.runtime.pipeline import typed_users
    from cddrec.vocab import is_int_key

    keys = [k for k in keys if not any(0xD800 <= ord(c) < 0xE000 for c in k)]  # not valid Unicode
    typed, bad = typed_users(pa.array(keys, pa.string()), "int")
    assert bad.tolist() == [not is_int_key(k) for k in keys]
    assert typed.to_pylist() == [0 if b else int(k) for k, b in zip(keys, bad)]
