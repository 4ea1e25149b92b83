"""Write the second half of WikiText-2 test (by lines) as a plain text file.

The calibration-source ablation needs "a plain local text file". This one is in the evaluation's
domain but disjoint from the text it evaluates: the sweep scores only the first windows of the
test file (12 × 1024 tokens, about the first 4% of it), and this file starts at its middle.

    python benchmarks/wikitext_tail.py ../shared/data/wikitext-2-raw-v1/wiki.test.raw \
        runs/wikitext_test_second_half.txt
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    lines = [ln for ln in args.source.read_text(encoding="utf-8").splitlines() if ln.strip()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines[len(lines) // 2 :]) + "\n", encoding="utf-8")
    print(f"wrote {len(lines) - len(lines) // 2} of {len(lines)} lines to {args.out}")


if __name__ == "__main__":
    main()
