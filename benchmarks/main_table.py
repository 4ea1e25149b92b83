"""The main results table from a sweep's cells.jsonl: a row per regime and method with
perplexity, mean zero-shot accuracy (acc and acc_norm) and pruning seconds (solver apart).

    python benchmarks/main_table.py docs/results/cells.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REGIMES = (("unstructured", 0.5, None, "50% unstructured"), ("4:8", 0.5, None, "4:8"),
           ("2:4", 0.5, None, "2:4"), ("structured", 0.3, 0.0, "structured 30%, α=0"),
           ("structured", 0.3, 0.1, "structured 30%, α=0.1"))
METHODS = ("magnitude", "wanda", "sparsegpt", "thanos")


def _number(value, form: str) -> str:
    return "–" if value is None else format(value, form)


def _cell_text(row: dict | None) -> str:
    if row is None:
        return "not run | – | – | – | –"
    ppl = next(iter(row["perplexity"].values()))
    mean = row.get("zeroshot", {}).get("mean", {})
    timing = row.get("timing", {})
    return " | ".join([f"{ppl:.3g}" if ppl >= 1e4 else f"{ppl:.2f}",
                       _number(mean.get("acc"), ".3f"), _number(mean.get("acc_norm"), ".3f"),
                       _number(timing.get("pruning_seconds"), ".1f"),
                       _number(timing.get("solver_seconds"), ".1f")])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cells", type=Path)
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.cells.read_text().splitlines() if line.strip()]
    main_rows = [r for r in rows if any(g.startswith("main") for g in r["grids"])]
    dense = next(r for r in main_rows if r["cell"]["method"] == "dense")
    print("| regime | method | WikiText-2 ppl | zero-shot acc | zero-shot acc_norm | pruning s "
          "| solver s |")
    print("|---|---|---|---|---|---|---|")
    print(f"| dense | – | {_cell_text(dense)} |")
    for pattern, sparsity, alpha, title in REGIMES:
        for method in METHODS:
            match = [r for r in main_rows if r["cell"]["method"] == method
                     and r["cell"]["pattern"] == pattern and r["cell"]["sparsity"] == sparsity
                     and r["cell"]["alpha"] == alpha]
            print(f"| {title} | {method} | {_cell_text(match[0] if match else None)} |")


if __name__ == "__main__":
    main()
