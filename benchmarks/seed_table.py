"""Error bars: mean ± standard deviation over calibration seeds, and head-to-head counts.

    python benchmarks/seed_table.py docs/results/seeds/cells.jsonl

Reads the cells of ``benchmarks/grids/smollm2_seeds.json`` and prints, per regime and method,
the perplexity on each evaluation text as mean ± sample standard deviation over the seeds, then
for each pair of methods in how many seeds the first is at least as good on every text.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

METHODS = ("wanda", "sparsegpt", "thanos")
PAIRS = (("thanos", "sparsegpt"), ("thanos", "wanda"), ("sparsegpt", "wanda"))


def regime(cell: dict) -> str:
    if cell["pattern"] == "structured":
        return f"structured {cell['sparsity']:.0%}, α={cell['alpha']:g}"
    if cell["pattern"] == "unstructured":
        return f"{cell['sparsity']:.0%} unstructured"
    return cell["pattern"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cells", type=Path)
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.cells.read_text().splitlines() if line.strip()]
    texts = list(rows[0]["perplexity"])
    dense = next(r for r in rows if r["cell"]["method"] == "dense")
    ppl: dict[tuple[str, str], dict[int, dict[str, float]]] = defaultdict(dict)
    for r in rows:
        c = r["cell"]
        if c["method"] in METHODS:
            ppl[(regime(c), c["method"])][c["seed"]] = r["perplexity"]
    regimes = list(dict.fromkeys(k[0] for k in ppl))
    head = " | ".join(f"{t} ppl (mean ± sd)" for t in texts)
    print(f"| regime | method | {head} | seeds |")
    print("|---|---|" + "---|" * len(texts) + "---|")
    print("| dense | – | " + " | ".join(f"{dense['perplexity'][t]:.2f}" for t in texts)
          + " | – |")
    for reg in regimes:
        for method in METHODS:
            by_seed = ppl.get((reg, method), {})
            cells = []
            for t in texts:
                values = [v[t] for v in by_seed.values()]
                if len(values) > 1:
                    cells.append(f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}")
                else:
                    cells.append(f"{values[0]:.2f} (one seed)" if values else "–")
            print(f"| {reg} | {method} | " + " | ".join(cells) + f" | {len(by_seed)} |")
    print()
    print("| regime | " + " | ".join(f"{a} ≤ {b}" for a, b in PAIRS) + " |")
    print("|---|" + "---|" * len(PAIRS))
    for reg in regimes:
        cells = []
        for a, b in PAIRS:
            seeds = sorted(set(ppl[(reg, a)]) & set(ppl[(reg, b)]))
            both = sum(all(ppl[(reg, a)][s][t] <= ppl[(reg, b)][s][t] for t in texts)
                       for s in seeds)
            per_text = [sum(ppl[(reg, a)][s][t] <= ppl[(reg, b)][s][t] for s in seeds)
                        for t in texts]
            cells.append(f"{both} of {len(seeds)} on both texts ("
                         + ", ".join(str(n) for n in per_text) + ")")
        print(f"| {reg} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
