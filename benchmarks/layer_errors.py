"""Per-layer-type reconstruction error of a sweep's cells, side by side per method.

Reads a sweep's cells.jsonl (layer errors ‖(Ŵ−W)X‖²/‖WX‖² on the calibration inputs each
layer saw) and prints, for each pattern, the mean error per layer type (q, k, v, o, gate, up,
down) and over the first, middle and last third of the blocks, one column per method. This is
the calibration-side view the results are read against: it needs no evaluation data.

    python benchmarks/layer_errors.py docs/results/cells.jsonl
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

from snapprune.engine import get_method

METHODS = ("wanda", "sparsegpt", "thanos")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cells", type=Path)
    parser.add_argument("--nsamples", type=int, default=16,
                        help="only cells calibrated on this many windows (default: 16)")
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.cells.read_text().splitlines() if line.strip()]
    chosen: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for row in rows:
        cell = row["cell"]
        if (cell["method"] not in METHODS or not row.get("layer_errors")
                or cell["nsamples"] != args.nsamples or cell["calib"] is None
                or "c4" not in cell["calib"]
                or cell["metric"] != get_method(cell["method"]).default_metric
                or cell["blocksize"] not in (None, 128)
                or cell["sparsity"] != (0.3 if cell["pattern"] == "structured" else 0.5)):
            continue
        regime = (cell["pattern"], cell["sparsity"], cell["alpha"])
        chosen[regime][cell["method"]] = row["layer_errors"]
    for regime, by_method in chosen.items():
        methods = [m for m in METHODS if m in by_method]
        pattern, sparsity, alpha = regime
        title = f"{pattern} {sparsity:g}" + (f" α={alpha:g}" if alpha is not None else "")
        print(f"\n{title}\n")
        print("| layers | " + " | ".join(methods) + " | thanos / sparsegpt |")
        print("|---|" + "---|" * (len(methods) + 1))
        groups: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for method in methods:
            errors = by_method[method]
            depth = max(int(re.search(r"\.(\d+)\.", n).group(1)) for n in errors) + 1
            for name, error in errors.items():
                kind = name.rsplit(".", 1)[-1].removesuffix("_proj")
                block = int(re.search(r"\.(\d+)\.", name).group(1))
                third = ("blocks 0-9", "blocks 10-19", "blocks 20-29")[min(2, 3 * block // depth)]
                for key in (kind, third, "all"):
                    groups[key][method].append(error)
        kinds = [k for k in ("q", "k", "v", "o", "gate", "up", "down") if k in groups]
        others = sorted(k for k in groups if k not in kinds and k != "all")
        for key in [*kinds, *others, "all"]:
            per_method = groups[key]
            means = {m: sum(v) / len(v) for m, v in per_method.items()}
            ratio = (f"{means['thanos'] / means['sparsegpt']:.3f}"
                     if "thanos" in means and "sparsegpt" in means else "–")
            print(f"| {key} | " + " | ".join(f"{means[m]:.4f}" for m in methods)
                  + f" | {ratio} |")


if __name__ == "__main__":
    main()
