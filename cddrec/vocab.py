"""Item keys <-> ids (torch-free).

Raw item keys are never embedding rows: keys are remapped to ids 1..N in order of first
appearance; 0 is padding and N+1 the augmentation's mask token. A vocabulary whose keys are all
canonical integers decodes back to ints, so integer keys round-trip through JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable


def is_int_key(k: str) -> bool:
    """True for canonical integers ("0", "17", "-3"; not "007"), which round-trip through int."""
    digits = k[1:] if k.startswith("-") else k
    return digits.isdigit() and (digits == "0" or not digits.startswith("0")) and k != "-0"


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
        return cls(list(d["keys"]), d.get("key_type", "str"))


