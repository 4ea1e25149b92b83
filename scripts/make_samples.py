"""Build the bundled text samples (``src/snapprune/samples/``) from the project's shared data.

    python scripts/make_samples.py ../shared/data

- ``c4-calibration.jsonl.gz``: the documents of at least 2,000 characters (~500 SmolLM2
  tokens and more) among the first 1,000 of the C4 ``en`` validation file;
- ``c4-evaluation.jsonl.gz``: its last 500 documents (the "C4 tail" the project's seed studies
  evaluate on), none of them in the calibration slice;
- ``wikitext-2-test.raw.gz``: the WikiText-2 raw test split as the shared copy holds it.

Files are gzipped with a fixed timestamp, so the same input gives the same bytes.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "snapprune" / "samples"
HEAD, TAIL, MIN_CHARS = 1000, 500, 2000


def _write_gz(path: Path, data: bytes) -> None:
    with gzip.GzipFile(path, mode="wb", mtime=0, compresslevel=9) as handle:
        handle.write(data)
    print(f"wrote {path} ({path.stat().st_size:,} bytes)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shared_data", type=Path)
    args = parser.parse_args()
    source = args.shared_data / "c4" / "c4-validation-2k-part1.json.gz"
    with gzip.open(source, "rt", encoding="utf-8") as handle:
        docs = [json.loads(line) for line in handle if line.strip()]
    calibration = [d for d in docs[:HEAD] if len(d["text"]) >= MIN_CHARS]
    evaluation = docs[-TAIL:]
    assert len(docs) - TAIL >= HEAD, "calibration and evaluation slices would overlap"

    def lines(part: list[dict]) -> bytes:
        return "".join(json.dumps({k: d[k] for k in ("text", "timestamp", "url")},
                                  ensure_ascii=False) + "\n" for d in part).encode("utf-8")

    OUT.mkdir(parents=True, exist_ok=True)
    _write_gz(OUT / "c4-calibration.jsonl.gz", lines(calibration))
    _write_gz(OUT / "c4-evaluation.jsonl.gz", lines(evaluation))
    wiki = args.shared_data / "wikitext-2-raw-v1" / "wiki.test.raw"
    _write_gz(OUT / "wikitext-2-test.raw.gz", wiki.read_bytes())
    print(f"{len(calibration)} calibration and {len(evaluation)} evaluation documents")


if __name__ == "__main__":
    main()
