"""What an output format is (``Format``), and the refusal when its package is missing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import SnapPruneError


@dataclass(frozen=True)
class Format:
    name: str
    check_job: Callable
    """``(job) -> None``: refuse what the format cannot hold, before any loading."""
    check_model: Callable
    """``(model, job) -> None``: refuse what needs the model (family, widths)."""
    write: Callable
    """``(outcome, directory) -> (files, notes)``: write the model into ``directory`` (a
    temporary directory renamed into place afterwards); return the files it wrote and any
    notes for the report."""



def require(package: str, extra: str) -> None:
    """A one-line refusal when an optional package is missing."""
    import importlib.util

    if importlib.util.find_spec(package) is None:
        raise SnapPruneError(f"this needs the {package} package: pip install "
                             f"'snapprune[{extra}]'")
