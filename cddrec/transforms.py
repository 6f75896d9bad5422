"""Sequence transforms: the cross-view augmentation of CL4SRec (numpy)."""

from __future__ import annotations

import math

import numpy as np

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


