"""Helpers of the cddrec-infer tests: run the command in process, read its errors file."""

from __future__ import annotations

import json

from click.testing import CliRunner

from cddrec.app.infer import main as infer_main


def infer(graph, req, out, *extra):
    """``cddrec-infer --model GRAPH --batch REQ -o OUT --quiet EXTRA...``: click's result."""
    return CliRunner().invoke(infer_main, ["--model", str(graph), "--batch", str(req), "-o", str(out), "--quiet",
                                           *extra])


def errors(out) -> list[dict]:
    """The records of OUT's errors file (JSONL: lines end at \\n only, keys may hold U+2028)."""
    return [json.loads(x) for x in out.with_name(out.name + ".errors.jsonl").read_text().split("\n")[:-1]]
