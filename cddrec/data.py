"""Data: users' item sequences, loading a data file, the leave-one-out split, training windows (numpy).

Letters: U users, B batch, L max_len, N items. Item ids are 1..N; 0 is padding and N+1
the mask token of the augmentation. Raw item keys are never used as embedding rows
(Office_Products and Tools_and_Home_Improvement contain item 0).

Split (paper section 4): for a user sequence s_1..s_n, training uses s_1..s_{n-2} (every
position of that prefix is a target), validation predicts s_{n-1} from s_1..s_{n-2}, and test
predicts s_n from s_1..s_{n-1}.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DataError
from .readers import TABLE_SUFFIXES, kcore_filter, read_interaction_table, read_sequence_file
from .vocab import Vocab

MIN_SEQUENCE = 3  # one training item, the validation target and the test target


@dataclass
class SequenceData:
    """Users' item sequences in time order, remapped to item ids 1..N."""

    users: list[str]  # user keys, one per sequence
    sequences: list[np.ndarray]  # int64 item ids, oldest first
    items: Vocab
    source: str = ""
    dropped_unknown: int = 0  # interactions dropped because their item is not in a given vocab
    filtered: dict = field(default_factory=dict)  # what load_data's k-core filter removed

    @property
    def num_items(self) -> int:
        return len(self.items)

    @property
    def num_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))

    def fingerprint(self) -> str:
        """sha256 of the item vocabulary and every sequence: identifies the data a model saw."""
        h = hashlib.sha256()
        h.update("\x1f".join(self.items.keys).encode())
        for u, s in zip(self.users, self.sequences):
            h.update(u.encode() + b"\x1e")
            h.update(np.ascontiguousarray(s, dtype=np.int64).tobytes())
        return h.hexdigest()

    def popularity(self, split: str = "train") -> np.ndarray:
        """Interaction counts per id (length N + 2) over the training prefixes (or all items)."""
        counts = np.zeros(self.num_items + 2, dtype=np.int64)
        for s in self.sequences:
            part = s[:-2] if split == "train" else s
            np.add.at(counts, part, 1)
        return counts

    def stats(self) -> dict:
        n = len(self.sequences)
        ints = self.num_interactions
        return {"users": n, "items": self.num_items, "interactions": ints,
                "avg_len": round(ints / max(n, 1), 2)}


LOG_KCORE = 5  # the k-core applied to interaction logs when none is given (the paper's data are 5-core)


def read_keys(path: str | Path, *, user_col: str = "user", item_col: str = "item",
              time_col: str | None = "timestamp", sep: str | None = None) -> tuple[list[str], list[list[str]]]:
    """(users, item-key sequences, oldest first) of a sequence file or an interaction log."""
    path = Path(path)
    if path.suffix.lower() in TABLE_SUFFIXES:
        return read_interaction_table(path, user_col, item_col, time_col, sep)
    return read_sequence_file(path)


def default_kcore(path: str | Path) -> int:
    """The k-core applied when none is given: ``LOG_KCORE`` for interaction logs, none (1) for
    ``.txt`` sequence files, which their author has already filtered."""
    return LOG_KCORE if Path(path).suffix.lower() in TABLE_SUFFIXES else 1


def load_data(path: str | Path, *, kcore: int | None = None, vocab: Vocab | None = None,
              user_col: str = "user", item_col: str = "item", time_col: str | None = "timestamp",
              sep: str | None = None, min_len: int = MIN_SEQUENCE) -> SequenceData:
    """Read a data file into remapped sequences.

    ``.txt`` files hold ``user item item ...`` lines; ``.csv``/``.tsv``/``.parquet`` files hold an
    interaction log. ``kcore=None`` applies ``default_kcore(path)``: 5 for logs, none for sequence
    files; what the filter removed is in ``data.filtered``. Without ``vocab`` a new item vocabulary
    is built (ids in order of first appearance); with one, unknown items are dropped and counted.
    Users left with fewer than ``min_len`` items (3 = one train, one valid, one test) are dropped.
    """
    path = Path(path)
    if kcore is None:
        kcore = default_kcore(path)
    users, seqs = read_keys(path, user_col=user_col, item_col=item_col, time_col=time_col, sep=sep)
    before = (len(users), len({it for s in seqs for it in s}), sum(len(s) for s in seqs))
    users, seqs = kcore_filter(users, seqs, kcore)
    after = (len(users), len({it for s in seqs for it in s}), sum(len(s) for s in seqs))
    data = from_keys(users, seqs, vocab=vocab, min_len=min_len, source=str(path))
    data.filtered = {"kcore": kcore, **{f"{name}_removed": b - a for name, b, a in
                                        zip(("users", "items", "interactions"), before, after)},
                     f"users_under_{min_len}_items": after[0] - len(data.users)}
    if not data.sequences:
        raise DataError(f"{path}: no user has {min_len} or more interactions after filtering "
                        f"(k-core {kcore})")
    return data


def from_keys(users: list[str], seqs: list[list[str]], *, vocab: Vocab | None = None, min_len: int = 1,
              source: str = "") -> SequenceData:
    """Remap key sequences to ids. Without ``vocab``, ids follow the order of first appearance;
    with one, unknown keys are dropped and counted. Users left with < ``min_len`` items are dropped."""
    if vocab is None:
        order: dict[str, None] = {}
        for s in seqs:
            for it in s:
                order.setdefault(it, None)
        vocab = Vocab.build(order)
    index = vocab.index
    out_users, out_seqs, dropped = [], [], 0
    for u, s in zip(users, seqs):
        ids = [index.get(it, 0) for it in s]
        kept = [i for i in ids if i]
        dropped += len(ids) - len(kept)
        if len(kept) >= min_len:
            out_users.append(u)
            out_seqs.append(np.asarray(kept, dtype=np.int64))
    return SequenceData(out_users, out_seqs, vocab, source=source, dropped_unknown=dropped)


# --------------------------------------------------------------------------------- split
def left_pad(seqs: list[np.ndarray], length: int) -> np.ndarray:
    """(len(seqs), length) int64, the last ``length`` items of each, left-padded with 0."""
    out = np.zeros((len(seqs), length), dtype=np.int64)
    for i, s in enumerate(seqs):
        s = s[-length:]
        if len(s):
            out[i, length - len(s):] = s
    return out


@dataclass
class EvalSplit:
    """Histories and held-out targets of one split, with each user's full seen-item set."""

    split: str
    users: np.ndarray  # (U,) row in SequenceData
    histories: np.ndarray  # (U, L) left-padded, most recent L items
    targets: np.ndarray  # (U,)
    seen_indptr: np.ndarray  # CSR over users: all items before the target (not only the last L)
    seen_items: np.ndarray

    def __len__(self) -> int:
        return len(self.users)

    def seen(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), S) the seen items of ``rows`` (every item before the target), left-padded with 0."""
        return left_pad([self.seen_items[self.seen_indptr[r]:self.seen_indptr[r + 1]] for r in rows],
                        max(1, int((self.seen_indptr[rows + 1] - self.seen_indptr[rows]).max(initial=0))))


def eval_split(data: SequenceData, split: str, max_len: int) -> EvalSplit:
    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    cut = 2 if split == "valid" else 1
    users, hist, tgt = [], [], []
    for u, s in enumerate(data.sequences):
        if len(s) < MIN_SEQUENCE:
            continue
        users.append(u)
        hist.append(s[:-cut])
        tgt.append(s[-cut])
    lens = np.array([len(h) for h in hist], dtype=np.int64)
    indptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    items = np.concatenate(hist).astype(np.int64) if hist else np.zeros(0, np.int64)
    return EvalSplit(split, np.asarray(users, dtype=np.int64), left_pad(hist, max_len),
                     np.asarray(tgt, dtype=np.int64), indptr, items)


def eval_split_from_keys(users: list[str], seqs: list[list[str]], vocab: Vocab, split: str,
                         max_len: int) -> tuple[EvalSplit, dict]:
    """The split of a file as it is (no filter), against a model's vocabulary, and what was changed.

    Every user with ``MIN_SEQUENCE`` or more items is evaluated. History items unknown to the
    vocabulary are dropped (counted); a target unknown to it gets id 0, which evaluation counts as
    a miss (counted). ``EvalSplit.users`` are indices into ``users``."""
    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    cut = 2 if split == "valid" else 1
    index = vocab.index
    rows, hist, tgt = [], [], []
    short = unknown_hist = unknown_tgt = 0
    for u, s in enumerate(seqs):
        if len(s) < MIN_SEQUENCE:
            short += 1
            continue
        ids = [index.get(it, 0) for it in s[:-cut]]
        kept = np.asarray([i for i in ids if i], dtype=np.int64)
        unknown_hist += len(ids) - len(kept)
        t = index.get(s[-cut], 0)
        unknown_tgt += t == 0
        rows.append(u)
        hist.append(kept)
        tgt.append(t)
    lens = np.array([len(h) for h in hist], dtype=np.int64)
    indptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    items = np.concatenate(hist).astype(np.int64) if hist else np.zeros(0, np.int64)
    report = {"users_in_file": len(users), "users_evaluated": len(rows),
              f"users_under_{MIN_SEQUENCE}_items": short, "unknown_history_items_dropped": unknown_hist,
              "unknown_targets_counted_as_misses": int(unknown_tgt)}
    return EvalSplit(split, np.asarray(rows, dtype=np.int64), left_pad(hist, max_len),
                     np.asarray(tgt, dtype=np.int64), indptr, items), report


def training_windows(data: SequenceData, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut each training prefix into windows so that every position is a target once.

    Returns ``windows`` (W, L + 1), left-padded (inputs are ``[:, :-1]``, targets ``[:, 1:]``)
    and ``owners`` (W,), the user row of each window.
    """
    rows, owners = [], []
    for u, s in enumerate(data.sequences):
        p = s[:-2]
        end = len(p)
        while end >= 2:
            rows.append(p[max(0, end - max_len - 1):end])
            owners.append(u)
            end -= max_len
    if not rows:
        raise DataError(f"{data.source}: no training prefix has two or more items")
    return left_pad(rows, max_len + 1), np.asarray(owners, dtype=np.int64)


