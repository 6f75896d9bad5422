"""Batch serving: stream a file of user histories through a ``Recommender``.

The columnar pipeline lives in :mod:`cddrec.runtime.pipeline` (engine loop),
:mod:`cddrec.runtime.requests` (reading and validating requests) and
:mod:`cddrec.runtime.writers` (JSONL/CSV/Parquet output); this module keeps the entry point.
"""

from __future__ import annotations

from pathlib import Path

from .pipeline import BadInput, BatchStats, run_file
from .recommender import Recommender
from .requests import BadLine, input_format, parse_line

__all__ = ["BadInput", "BadLine", "BatchStats", "input_format", "parse_line", "run_batch"]


def run_batch(rec: Recommender, input_path: str | Path, output_path: str | Path, *, k: int | None = None,
              batch_size: int = 256, strict: bool = False, output_format: str | None = None,
              in_format: str | None = None, check_duplicates: bool = True, progress: bool = False,
              log_options: dict | None = None, block_bytes: int | None = None) -> BatchStats:
    """Serve every request of ``input_path`` into ``output_path``; returns the counts.

    ``output_format`` jsonl | csv | parquet, by default from the output's suffix."""
    return run_file(rec, input_path, output_path, k=k, batch_size=batch_size, strict=strict,
                    output_format_=output_format, in_format=in_format, check_duplicates=check_duplicates,
                    progress=progress, log_options=log_options, block_bytes=block_bytes)
