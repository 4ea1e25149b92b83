"""Which dense model a pruned one came from: a recovery's default teacher."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import SnapPruneError
from ..outputs import REPORT_NAME


def teacher_source(student: str) -> str:
    """The model a snapprune output's report names as its source (followed back through
    outputs made from outputs), or a one-line refusal naming the fix."""
    seen = []
    spec = student
    for _ in range(8):
        report = Path(spec).expanduser() / REPORT_NAME
        if not report.is_file():
            break
        with open(report, encoding="utf-8") as handle:
            source = json.load(handle).get("model")
        if not source:
            break
        seen.append(source)
        spec = source
    if not seen:
        raise SnapPruneError(
            f"{student} has no snapprune report naming the dense model it came from; pass the "
            "teacher (--teacher DENSE), or use loss lm")
    return seen[-1]
