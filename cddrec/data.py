"""Data: reading interaction logs, vocabularies, the leave-one-out split, training batches.

Letters: U users, B batch, L max_len, N items. Item ids are 1..N; 0 is padding and N+1
the mask token of the augmentation. Raw item keys are never used as embedding rows
(Office_Products and Tools_and_Home_Improvement contain item 0).

Split (paper section 4): for a user sequence s_1..s_n, training uses s_1..s_{n-2} (every
position of that prefix is a target), validation predicts s_{n-1} from s_1..s_{n-2}, and test
predicts s_n from s_1..s_{n-1}.
"""

from __future__ import annotations

import csv
import hashlib
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

SEQUENCE_SUFFIXES = (".txt", ".seq")
TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".pq")


class DataError(ValueError):
    """Bad input data: the message names the file, the line and what was expected."""


def is_int_key(k: str) -> bool:
    """True for canonical integers ("0", "17", "-3"; not "007"), which round-trip through int."""
    digits = k[1:] if k.startswith("-") else k
    return digits.isdigit() and (digits == "0" or not digits.startswith("0")) and k != "-0"


def typed_key(k: str):
    """A canonical integer key is written back as an int, anything else as a string."""
    return int(k) if is_int_key(k) else k


# ---------------------------------------------------------------------------- vocabulary
@dataclass
class Vocab:
    """Item keys <-> ids. ``keys[i]`` is the key of id ``i + 1``."""

    keys: list[str]
    key_type: str = "str"  # "int" when every key is a canonical integer: decoded back to int
    _index: dict[str, int] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def build(cls, keys: Iterable[str]) -> "Vocab":
        keys = [str(k) for k in keys]
        key_type = "int" if keys and all(is_int_key(k) for k in keys) else "str"
        return cls(keys, key_type)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def index(self) -> dict[str, int]:
        if self._index is None:
            self._index = {k: i + 1 for i, k in enumerate(self.keys)}
        return self._index

    def id(self, key) -> int:
        """Id of a key (str or int), 0 when unknown."""
        return self.index.get(str(key), 0)

    def key(self, item_id: int):
        k = self.keys[int(item_id) - 1]
        return int(k) if self.key_type == "int" else k

    def decode(self, ids: Iterable[int]) -> list:
        return [self.key(i) for i in ids]

    def to_dict(self) -> dict:
        return {"keys": list(self.keys), "key_type": self.key_type}

    @classmethod
    def from_dict(cls, d: dict) -> "Vocab":
        return cls(list(d["keys"]), d.get("key_type", "str"))


@dataclass
class SequenceData:
    """Users' item sequences in time order, remapped to item ids 1..N."""

    users: list[str]  # user keys, one per sequence
    sequences: list[np.ndarray]  # int64 item ids, oldest first
    items: Vocab
    source: str = ""
    dropped_unknown: int = 0  # interactions dropped because their item is not in a given vocab

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


# ------------------------------------------------------------------------------- readers
def read_sequence_file(path: str | Path) -> tuple[list[str], list[list[str]]]:
    """Read ``user item item ...`` lines (time order). Blank lines are skipped."""
    path = Path(path)
    users: list[str] = []
    seqs: list[list[str]] = []
    seen: dict[str, int] = {}
    for lineno, line in _lines(path):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2:
            raise DataError(f"{path}:{lineno}: expected 'user item [item ...]' (a user key and at "
                            f"least one item key), got 1 field: {line.strip()[:80]!r}")
        u = parts[0]
        if u in seen:
            raise DataError(f"{path}:{lineno}: user {u!r} appears again (first on line {seen[u]}); "
                            "the sequence format needs one line per user")
        seen[u] = lineno
        users.append(u)
        seqs.append(parts[1:])
    if not users:
        raise DataError(f"{path}: no sequences found (expected lines 'user item item ...')")
    return users, seqs


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """Numbered text lines, decoded one by one so a byte that is not UTF-8 names its line."""
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a data file")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {e.start + 1}: {e.reason})") from None


def read_interaction_table(path: str | Path, user_col: str = "user", item_col: str = "item",
                           time_col: str | None = "timestamp", sep: str | None = None
                           ) -> tuple[list[str], list[list[str]]]:
    """Read a CSV, TSV or Parquet log with user, item and timestamp columns.

    Interactions are stably sorted by time within each user (ties keep file order); with
    ``time_col=None`` file order is time order. Returns users in order of first appearance.
    """
    path = Path(path)
    rows = _table_rows(path, [user_col, item_col] + ([time_col] if time_col else []), sep)
    per_user: dict[str, list[tuple[float, int, str]]] = defaultdict(list)
    for lineno, rec in rows:
        u, it = rec[0], rec[1]
        if u == "" or it == "":
            raise DataError(f"{path}:{lineno}: empty {'user' if u == '' else 'item'} value")
        if time_col:
            try:
                t = float(rec[2])
            except (TypeError, ValueError):
                raise DataError(f"{path}:{lineno}: column {time_col!r} must be a number "
                                f"(unix time), got {rec[2]!r}") from None
            if math.isnan(t):
                raise DataError(f"{path}:{lineno}: column {time_col!r} is NaN")
        else:
            t = 0.0
        per_user[u].append((t, lineno, it))
    if not per_user:
        raise DataError(f"{path}: no interactions found")
    users = list(per_user)
    seqs = [[it for _, _, it in sorted(per_user[u], key=lambda r: (r[0], r[1]))] for u in users]
    return users, seqs


def _table_rows(path: Path, cols: list[str], sep: str | None) -> Iterator[tuple[int, list[str]]]:
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from e
        if not path.exists():
            raise DataError(f"{path}: no such file")
        try:
            table = pq.read_table(path)
        except Exception as e:  # noqa: BLE001 - pyarrow raises many types
            raise DataError(f"{path}: not a readable Parquet file: {e}") from e
        missing = [c for c in cols if c not in table.column_names]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; found {table.column_names} "
                            "(set --user-col/--item-col/--time-col)")
        columns = [table.column(c).to_pylist() for c in cols]
        for i, rec in enumerate(zip(*columns)):
            yield i + 2, ["" if v is None else str(v) for v in rec]  # "line" = row + header
        return
    if sep is None:
        sep = "\t" if suffix == ".tsv" else ","
    reader = csv.reader((line for _, line in _lines(path)), delimiter=sep)
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"{path}: empty file, expected a header line with {cols}") from None
    header = [h.strip() for h in header]
    missing = [c for c in cols if c not in header]
    if missing:
        raise DataError(f"{path}:1: missing column(s) {missing} in header {header} "
                        "(set --user-col/--item-col/--time-col)")
    idx = [header.index(c) for c in cols]
    width = len(header)
    for rec in reader:
        lineno = reader.line_num
        if not rec or all(not x.strip() for x in rec):
            continue
        if len(rec) != width:
            raise DataError(f"{path}:{lineno}: expected {width} fields as in the header, got {len(rec)}")
        yield lineno, [rec[i].strip() for i in idx]


def kcore_filter(users: list[str], seqs: list[list[str]], k: int) -> tuple[list[str], list[list[str]]]:
    """Keep users and items with at least k interactions, repeated until both hold."""
    if k <= 1:
        return users, seqs
    while True:
        counts = Counter(it for s in seqs for it in s)
        new = [[it for it in s if counts[it] >= k] for s in seqs]
        keep = [i for i, s in enumerate(new) if len(s) >= k]
        changed = len(keep) != len(seqs) or any(len(new[i]) != len(seqs[i]) for i in keep)
        users, seqs = [users[i] for i in keep], [new[i] for i in keep]
        if not changed:
            return users, seqs


def load_data(path: str | Path, *, kcore: int = 5, vocab: Vocab | None = None,
              user_col: str = "user", item_col: str = "item", time_col: str | None = "timestamp",
              sep: str | None = None, min_len: int = 3) -> SequenceData:
    """Read a data file into remapped sequences.

    ``.txt`` files hold ``user item item ...`` lines; ``.csv``/``.tsv``/``.parquet`` files hold an
    interaction log. Without ``vocab`` a new item vocabulary is built (ids in order of first
    appearance); with one (evaluating a trained model), unknown items are dropped and counted.
    Users left with fewer than ``min_len`` items (3 = one train, one valid, one test) are dropped.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in TABLE_SUFFIXES:
        users, seqs = read_interaction_table(path, user_col, item_col, time_col, sep)
    else:
        users, seqs = read_sequence_file(path)
    users, seqs = kcore_filter(users, seqs, kcore)
    data = from_keys(users, seqs, vocab=vocab, min_len=min_len, source=str(path))
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

    def seen(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row-in-batch, item) pairs of the seen items of ``rows`` (for masking scores)."""
        starts, ends = self.seen_indptr[rows], self.seen_indptr[rows + 1]
        lens = ends - starts
        r = np.repeat(np.arange(len(rows)), lens)
        idx = np.concatenate([self.seen_items[a:b] for a, b in zip(starts, ends)]) if len(rows) else \
            np.zeros(0, dtype=np.int64)
        return r, idx


def eval_split(data: SequenceData, split: str, max_len: int) -> EvalSplit:
    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    cut = 2 if split == "valid" else 1
    users, hist, tgt = [], [], []
    for u, s in enumerate(data.sequences):
        if len(s) < 3:
            continue
        users.append(u)
        hist.append(s[:-cut])
        tgt.append(s[-cut])
    lens = np.array([len(h) for h in hist], dtype=np.int64)
    indptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    items = np.concatenate(hist).astype(np.int64) if hist else np.zeros(0, np.int64)
    return EvalSplit(split, np.asarray(users, dtype=np.int64), left_pad(hist, max_len),
                     np.asarray(tgt, dtype=np.int64), indptr, items)


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


# ----------------------------------------------------------------------------- negatives
class NegativeSampler:
    """Uniform negatives from 1..N, never one of the user's own items (any split).

    Membership is tested for the whole batch at once with ``searchsorted`` over sorted
    ``user * (N + 2) + item`` keys; colliding draws are redrawn in rounds, not per item.
    """

    def __init__(self, sequences: list[np.ndarray], num_items: int):
        self.num_items = num_items
        self.stride = num_items + 2
        keys = [u * self.stride + np.unique(s) for u, s in enumerate(sequences)]
        self.keys = np.sort(np.concatenate(keys)) if keys else np.zeros(0, np.int64)

    def owned(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        q = users * self.stride + items
        pos = np.searchsorted(self.keys, q)
        pos = np.minimum(pos, len(self.keys) - 1)
        return self.keys[pos] == q

    def sample(self, users: np.ndarray, shape: tuple[int, ...], rng: np.random.Generator,
               max_rounds: int = 50) -> np.ndarray:
        """(len(users), *shape[1:]) negatives; ``users`` broadcasts over the trailing axes."""
        u = np.broadcast_to(users.reshape(-1, *([1] * (len(shape) - 1))), shape)
        neg = rng.integers(1, self.num_items + 1, size=shape)
        for _ in range(max_rounds):
            bad = self.owned(u, neg)
            n_bad = int(bad.sum())
            if n_bad == 0:
                break
            neg[bad] = rng.integers(1, self.num_items + 1, size=n_bad)
        return neg


# ------------------------------------------------------------------------- augmentation
CROP_ETA, MASK_GAMMA, REORDER_BETA = 0.6, 0.3, 0.6


def augment(inputs: np.ndarray, mask_id: int, rng: np.random.Generator) -> np.ndarray:
    """Cross-view augmentation (CL4SRec): crop, mask or reorder, one drawn per sequence.

    ``inputs`` (B, L) left-padded. The released code always reorders (its ``random.sample``
    returns a list that never equals 0 or 1); here each sequence draws one of the three.
    """
    B, L = inputs.shape
    out = np.zeros_like(inputs)
    choice = rng.integers(0, 3, size=B)
    for b in range(B):
        s = inputs[b][inputs[b] > 0]
        n = len(s)
        if n == 0:
            continue
        c = choice[b]
        if c == 0:  # crop: a contiguous floor(eta n) >= 1 items
            keep = max(1, int(math.floor(n * CROP_ETA)))
            start = int(rng.integers(0, n - keep + 1))
            s = s[start:start + keep]
        elif c == 1:  # mask: floor(gamma n) positions become the mask token
            m = int(math.floor(n * MASK_GAMMA))
            if m:
                s = s.copy()
                s[rng.choice(n, size=m, replace=False)] = mask_id
        else:  # reorder: shuffle a contiguous span of floor(beta n)
            r = int(math.floor(n * REORDER_BETA))
            if r > 1:
                start = int(rng.integers(0, n - r + 1))
                s = s.copy()
                s[start:start + r] = rng.permutation(s[start:start + r])
        out[b, L - len(s):] = s
    return out


# ------------------------------------------------------------------------------ batches
class TrainBatches:
    """Shuffled training batches: inputs, targets, negatives and an augmented view (B, L)."""

    def __init__(self, data: SequenceData, max_len: int, batch_size: int, seed: int = 0):
        self.windows, self.owners = training_windows(data, max_len)
        self.sampler = NegativeSampler(data.sequences, data.num_items)
        self.mask_id = data.num_items + 1
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.windows) / self.batch_size)

    @property
    def num_targets(self) -> int:
        return int((self.windows[:, 1:] > 0).sum())

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order = self.rng.permutation(len(self.windows))
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            if len(idx) < 2:  # InfoNCE needs in-batch negatives
                continue
            w = self.windows[idx]
            inputs = w[:, :-1]
            targets = np.where(inputs > 0, w[:, 1:], 0)  # a window's first item has no history
            negatives = self.sampler.sample(self.owners[idx], targets.shape, self.rng)
            negatives[targets == 0] = 0
            yield {
                "input_ids": torch.from_numpy(np.ascontiguousarray(inputs)),
                "targets": torch.from_numpy(np.ascontiguousarray(targets)),
                "negatives": torch.from_numpy(negatives),
                "aug_ids": torch.from_numpy(augment(inputs, self.mask_id, self.rng)),
            }


# ----------------------------------------------------------------------- synthetic data
def make_synthetic(num_users: int = 2000, num_items: int = 300, num_clusters: int = 12,
                   min_len: int = 5, max_len: int = 30, p_follow: float = 0.75,
                   p_shift: float = 0.1, seed: int = 0, item_key_offset: int = 0) -> SequenceData:
    """Seeded synthetic logs with planted sequential structure.

    Items are split into clusters; each cluster is an ordered chain. A user starts in a random
    cluster and at each step follows the chain (``p_follow``), jumps to a random item of the
    same cluster, or with ``p_shift`` shifts intent to another cluster. A model that learns the
    chains predicts the next item well; a popularity model does not. Item keys start at
    ``item_key_offset`` (0 by default, so key 0 exists as in the Amazon files).
    """
    rng = np.random.default_rng(seed)
    perm = rng.permutation(num_items)
    clusters = np.array_split(perm, num_clusters)
    where = {int(it): (c, j) for c, members in enumerate(clusters) for j, it in enumerate(members)}
    users, seqs = [], []
    for u in range(num_users):
        n = int(rng.integers(min_len, max_len + 1))
        c = int(rng.integers(num_clusters))
        cur = int(rng.choice(clusters[c]))
        s = [cur]
        while len(s) < n:
            r = rng.random()
            c, j = where[cur]
            members = clusters[c]
            if r < p_shift:
                c = int(rng.integers(num_clusters))
                cur = int(rng.choice(clusters[c]))
            elif r < p_shift + p_follow:
                cur = int(members[(j + 1) % len(members)])
            else:
                cur = int(rng.choice(members))
            if cur in s[-3:]:  # avoid immediate repeats so seen-item masking is not trivial
                cur = int(members[(where[cur][1] + 2) % len(members)])
            s.append(cur)
        users.append(f"u{u}")
        seqs.append([str(it + item_key_offset) for it in s])
    return from_keys(users, seqs, source=f"synthetic(seed={seed})")


def write_sequence_file(data: SequenceData, path: str | Path) -> None:
    """Write ``user item item ...`` lines with the original keys (atomic)."""
    from .io import atomic_write_text

    lines = [" ".join([u] + [data.items.keys[i - 1] for i in s]) for u, s in zip(data.users, data.sequences)]
    atomic_write_text(path, "\n".join(lines) + "\n")
