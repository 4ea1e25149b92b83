"""The mutation check (``benchmarks/mutants.py``) only means something while every mutant still
applies: each edit's text must sit exactly once in its file, and each named test must exist.
Checked here in a second so a refactor that moves code fails the tests, not the slow check."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _mutants():
    spec = importlib.util.spec_from_file_location("snapprune_mutants",
                                                  ROOT / "benchmarks" / "mutants.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


MODULE = _mutants()


@pytest.mark.parametrize("mutant", MODULE.MUTANTS, ids=lambda m: m.name)
def test_every_mutant_applies_once_and_names_real_tests(mutant) -> None:
    text = (MODULE.SOURCE / mutant.file).read_text()
    for old, new in mutant.edits:
        assert old != new
        assert text.count(old) == 1, f"{mutant.name}: {old!r} found {text.count(old)} times"
    for test in mutant.tests:
        path, _, name = test.partition("::")
        assert (ROOT / path).is_file(), test
        if name:
            assert f"def {name.split('[')[0]}(" in (ROOT / path).read_text(), test


def test_mutant_names_are_unique() -> None:
    names = [m.name for m in MODULE.MUTANTS]
    assert len(names) == len(set(names))
