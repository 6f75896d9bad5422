"""Item keys <-> ids (torch-free).

Raw item keys are never embedding rows: keys are remapped to ids 1..N in order of first
appearance; 0 is padding and N+1 the augmentation's mask token. A vocabulary whose keys are all
canonical integers decodes back to ints, so integer keys round-trip through JSON.

The key rule, everywhere: only ASCII digits (with a leading "-", no leading zero) that fit int64
are integers; every other key is a string, kept byte for byte (never normalized); an integer
beyond int64 is a bad line (``key_problem``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

INT64_MIN, INT64_MAX = -2**63, 2**63 - 1


def _digits(k: str) -> str:
    return k[1:] if k.startswith("-") else k


def ascii_digits(s: str) -> bool:
    """Only the digits 0-9 (``str.isdigit`` alone also takes "²" and "١٧", which ``int`` refuses or reads)."""
    return s.isascii() and s.isdigit()


def is_int_key(k: str) -> bool:
    """True for canonical integers in ASCII that fit int64 ("0", "17", "-3"; not "007", "-0", "²",
    "١٧" or "+5"): these round-trip through int. Every other key is a string, byte for byte."""
    d = _digits(k)
    return (ascii_digits(d) and (d == "0" or not d.startswith("0")) and k != "-0"
            and INT64_MIN <= int(k) <= INT64_MAX)


def int_keys(strings):
    """``is_int_key`` over a pyarrow string array at once: (int64 array, 0 where not an integer; mask of the keys
    that are not). Canonical ASCII integers by a regular expression; the few of 19+ digits (which may not fit
    int64) checked one by one."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    canonical = np.asarray(pc.match_substring_regex(strings, r"^(0|-?[1-9][0-9]*)$").fill_null(False))
    long = canonical & (np.asarray(pc.utf8_length(strings).fill_null(0)) >= 19)  # may not fit int64
    short = canonical & ~long
    values = np.zeros(len(strings), dtype=np.int64)
    values[short] = pc.cast(strings.filter(pa.array(short)), pa.int64()).to_numpy()
    ok = short.copy()
    for i in np.flatnonzero(long):
        key = strings[int(i)].as_py()
        if is_int_key(key):
            values[i], ok[i] = int(key), True
    return pa.array(values), ~ok


def key_problem(key) -> str | None:
    """Why ``key`` (a value read from a file or a request) cannot be a user or item key, else None.

    The one key rule: a key is a string or an integer. An integer (or a canonical ASCII integer
    string) must fit int64; a string must be valid Unicode (no lone surrogate, which JSON's
    ``\\udc00`` escape can produce)."""
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        return f"must be a string or integer, got {type(key).__name__}"
    if isinstance(key, int):
        return None if INT64_MIN <= key <= INT64_MAX else f"integer {_short(str(key))} does not fit 64 bits"
    d = _digits(key)
    if ascii_digits(d) and (d == "0" or not d.startswith("0")) and key != "-0" and len(d) >= 19 \
            and not INT64_MIN <= int(key) <= INT64_MAX:
        return f"integer {_short(key)} does not fit 64 bits"
    try:
        key.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"{_short(repr(key))} is not valid Unicode text (lone surrogate {key[e.start]!r})"
    return None


def _short(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[:n] + "..."


def typed_key(k: str):
    """A canonical integer key is written back as an int, anything else as a string."""
    return int(k) if is_int_key(k) else k


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
        """A saved vocabulary; ``key_type`` "int" is kept only where every key is an integer under
        today's rule (files written before it called "²" or "١٧" integers)."""
        keys = [str(k) for k in d["keys"]]
        int_ok = d.get("key_type", "str") == "int" and all(is_int_key(k) for k in keys)
        return cls(keys, "int" if int_ok else "str")


