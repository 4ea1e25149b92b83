"""Split the local C4 validation file into a calibration part and a held-out evaluation part.

The seed table calibrates on the first documents and evaluates on the last ones, so its C4
perplexity is measured on text no calibration window was ever drawn from.

    python benchmarks/c4_split.py ../shared/data/c4/c4-validation-2k-part1.json.gz runs/
        (writes runs/c4_calibration_docs.jsonl and runs/c4_heldout_docs.jsonl)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from snapprune.data import read_documents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--heldout", type=int, default=500,
                        help="documents at the end kept for evaluation (default: 500)")
    args = parser.parse_args()
    docs = read_documents(args.source)
    cut = len(docs) - args.heldout
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, part in (("c4_calibration_docs.jsonl", docs[:cut]),
                       ("c4_heldout_docs.jsonl", docs[cut:])):
        path = args.out_dir / name
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in part), encoding="utf-8")
        print(f"wrote {len(part)} documents to {path}")


if __name__ == "__main__":
    main()
