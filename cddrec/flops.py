"""FLOPs of one user's recommendation, by part and by operand (torch-free).

The count a roofline divides a measured matmul peak by (``cddrec.benchmarks.roofline``), and the
one ``CDDRec.flops_per_user`` reports. Multiply-adds x 2. ``cfg`` is any object with
``hidden_size`` (d), ``max_len`` (L), ``num_rows`` (V = N + 2), ``decoder_steps`` (T, 0 without
a decoder) and ``num_layers``: a ``ModelConfig`` or the config stored in a graph's metadata.
``steps`` S counts an early-exit graph (``cddrec-export --steps S``: S of the T reverse steps run);
None counts all T.
"""

from __future__ import annotations


def decoder_steps_run(cfg, steps: int | None = None) -> int:
    """Reverse steps a graph of ``cfg`` runs: S (early exit), or T (0 without a decoder)."""
    T = cfg.decoder_steps
    if steps is None or not T:
        return T
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be between 1 and T={T}, got {steps}")
    return steps


def flops_per_user(cfg, plain: bool = False, steps: int | None = None) -> dict[str, float]:
    """Multiply-adds x 2 per user, by part. ``plain``: the reference decodes all L positions and
    projects keys/values at every step; otherwise one position and one projection (the exported
    graph and the hoisted path). Scoring covers the whole item table (V = N + 2 rows). ``steps``:
    S of the T steps (early exit)."""
    d, L, V = cfg.hidden_size, cfg.max_len, cfg.num_rows
    T = decoder_steps_run(cfg, steps)
    enc = cfg.num_layers * L * (8 * d * d + 16 * d * d + 4 * L * d)  # QKVO, FFN (4d), attention scores + mix
    kv = 4 * L * d * d  # decoder key/value projections of the history
    step = 4 * d * d + 4 * L * d  # query + output projections, attention over L keys
    if plain:
        dec, kv_once = T * (kv + L * step), 0
    else:
        dec, kv_once = T * step, (kv if T else 0)
    out = {"encoder": float(enc), "decoder_kv": float(kv_once), "decoder_steps": float(dec), "scoring": 2.0 * d * V}
    out["total"] = float(sum(out.values()))
    return out


def flops_by_operand(cfg, steps: int | None = None) -> dict[str, float]:
    """The graph's FLOPs per user (``flops_per_user``, not ``plain``) split by what a MatMul multiplies,
    which decides its precision in a quantized graph:

    - ``weights``: activations x trained weight matrices (encoder QKVO and FFN, decoder key/value,
      query and output projections): the MatMuls ``cddrec-export --int8`` stores in int8;
    - ``attention``: activations x activations (attention scores and mixing): fp32 in every graph;
    - ``scoring``: the user vector x the item table (int8 only with ``--int8-scoring``, or the
      candidate pass of ``--rescore``).

    The three sum to ``flops_per_user(cfg, steps=steps)["total"]``."""
    d, L, V, T = cfg.hidden_size, cfg.max_len, cfg.num_rows, decoder_steps_run(cfg, steps)
    weights = cfg.num_layers * L * 24 * d * d + (4 * L * d * d if T else 0) + T * 4 * d * d
    attention = cfg.num_layers * L * 4 * L * d + T * 4 * L * d
    return {"weights": float(weights), "attention": float(attention), "scoring": 2.0 * d * V}
