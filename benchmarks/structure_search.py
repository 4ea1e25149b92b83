"""A searched smaller structure against llama.cpp's dense quantisation, measured in llama.cpp.

For SmolLM2 (or ``--model``): ``snapprune search`` to a GGUF size of ``--fraction`` times
llama.cpp's own ``Q4_0 --imatrix`` file (from ``gguf_frontier.py``'s output, ``--frontier``),
then GPTQ ``q4_0`` in the same job; beside it the uniform cut at the same bytes (``shrink
--mlp`` alone, the search grid's width-only structure) quantised the same way. Every file is
measured by ``llama-perplexity`` (WikiText-2 test and the C4 tail, perplexity and KL divergence
from the dense f16 file) and by ``llama-bench`` (prefill and decode tokens/s, 2 threads, the
files interleaved in ``--rounds`` rounds, mean and spread over rounds).

    python benchmarks/gguf_frontier.py --out runs/frontier --types q4_0   # the reference
    python benchmarks/structure_search.py --frontier runs/frontier --out runs/search
    python benchmarks/structure_search.py --frontier runs/frontier --out runs/search-heads \
        --heads --points 2        # query-head cuts in the grid too
    python benchmarks/structure_search.py --frontier runs/frontier --out runs/search-e4 \
        --embedding-type iq4_nl   # the embedding / output matrix at 4 bits too

Writes ``results.json`` and ``table.md`` into ``--out``; finished parts are reused on a rerun.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))

from gguf_frontier import CALIBRATION, _measure, _run
from llama_tools import bench, tools

REFERENCE = "llama Q4_0 --imatrix seed 0"


def _snapprune(out: Path, name: str, steps: list, model: str, docs: Path, log: Path) -> Path:
    """A recipe of ``steps`` run into ``out/name``; the GGUF file."""
    target = out / name
    if (target / "model.gguf").is_file():
        return target / "model.gguf"
    recipe = {"model": model, "steps": steps,
              "calibration": {"source": str(docs), "nsamples": CALIBRATION[0],
                              "seqlen": CALIBRATION[1], "seed": 0},
              "evaluation": {"ppl": ["wikitext2-test"], "dense": False},
              "execution": {"layer_errors": False},
              "output": {"format": "gguf", "samples": False}}
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    _run(["snapprune", "run", str(path), "--out", str(target), "--overwrite", "--quiet"], log)
    return target / "model.gguf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frontier", type=Path, required=True,
                        help="gguf_frontier.py's output (the reference file, texts, f16 bases)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--fraction", type=float, default=0.8)
    parser.add_argument("--points", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--heads", action="store_true",
                        help="the search also tries query-head cuts (search --heads)")
    parser.add_argument("--embedding-type", metavar="TYPE",
                        help="the token embedding / output matrix at this llama.cpp type in "
                             "the search's sizes and both snapprune files (default: q8_0)")
    parser.add_argument("--also", nargs="*", default=[], metavar="LABEL=GGUF",
                        help="more GGUF files measured beside (e.g. the searched model after "
                             "recover and quantize)")
    args = parser.parse_args()
    frontier, out = args.frontier.resolve(), args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    known = json.loads((frontier / "results.json").read_text())["files"]
    if REFERENCE not in known:
        raise SystemExit(f"{frontier} has no {REFERENCE!r}: run gguf_frontier.py --types q4_0")
    size = round(known[REFERENCE]["mb"] * args.fraction, 2)
    docs = frontier / "c4_calibration_docs.jsonl"
    bin_ = tools()
    reference = frontier / "llama-q4_0-imatrix-seed0.gguf"
    if not reference.is_file():  # the frontier keeps its measurements, not always its files
        reference = out / "llama-q4_0-imatrix-seed0.gguf"
        if not reference.is_file():
            _run([str(bin_["llama-quantize"]), "--imatrix", str(frontier / "imatrix_seed0.gguf"),
                  str(frontier / "f16.gguf"), str(reference), "Q4_0", "2"],
                 out / "llama-q4_0-imatrix.log")
    files = {"llama.cpp Q4_0 --imatrix (dense)": reference}
    results.setdefault("files", {})["llama.cpp Q4_0 --imatrix (dense)"] = dict(known[REFERENCE])

    start = time.perf_counter()
    quantize = {"quantize": {"scheme": "q4_0", "method": "gptq",
                             **({"embedding_type": args.embedding_type}
                                if args.embedding_type else {})}}
    searched = _snapprune(out, "searched", [
        {"search": {"target_size": size, "gguf_type": "q4_0", "points": args.points,
                    **({"heads": True} if args.heads else {})}},
        quantize], args.model, docs, out / "searched.log")
    report = json.loads((searched.parent / "snapprune_report.json").read_text())
    search = report["search"]
    chosen = search["tried"][search["chosen"]]
    results["search"] = {"target_mb": size, "tried": search["tried"], "chosen": search["chosen"],
                         "seconds": results.get("search", {}).get("seconds")
                         or time.perf_counter() - start}
    files[f"snapprune search ({chosen['structure']}) + q4_0"] = searched
    width_only = next((t for t in search["tried"]
                       if not t["blocks_removed"] and not t["attention_removed"]
                       and not t.get("heads_removed_per_group")), None)
    if width_only is not None:
        mlp = 1 - width_only["mlp_width"] / width_only["mlp_width_dense"]
        uniform = _snapprune(out, "uniform", [
            {"shrink": {"method": "thanos", "mlp": round(mlp, 6)}}, quantize], args.model,
            docs, out / "uniform.log")
        files[f"snapprune shrink --mlp {mlp:.3f} (uniform) + q4_0"] = uniform
    for item in args.also:
        label, _, path = item.partition("=")
        files[label] = Path(path).resolve()
    bases = {name: frontier / f"{name}.kld-base" for name in ("wikitext", "c4")}
    for key, path in files.items():
        entry = results["files"].setdefault(key, {})
        entry["mb"] = path.stat().st_size / 1e6
        for name, base in bases.items():
            if name not in entry:
                slug = re.sub(r"[^\w.-]+", "_", key)[:60]
                entry[name] = _measure(bin_, path, base, out / f"{slug}.{name}.log")
        results_path.write_text(json.dumps(results, indent=1))
    results["speed"] = bench(bin_, files, args.rounds, out / "bench.log")
    results_path.write_text(json.dumps(results, indent=1))
    _table(results, out)


def _table(results: dict, out: Path) -> None:
    dense = results["files"]["llama.cpp Q4_0 --imatrix (dense)"]
    speed = results["speed"]
    lines = ["| file | MB | WikiText-2 ppl | C4 tail ppl | × dense ppl (W / C) | KLD W / C | "
             "prefill tok/s | decode tok/s |", "|---|--:|--:|--:|--:|--:|--:|--:|"]
    for key, entry in results["files"].items():
        s = speed[key]
        lines.append(
            f"| {key} | {entry['mb']:.1f} | {entry['wikitext']['ppl']:.2f} | "
            f"{entry['c4']['ppl']:.2f} | {entry['wikitext']['ppl'] / dense['wikitext']['ppl']:.2f}"
            f" / {entry['c4']['ppl'] / dense['c4']['ppl']:.2f} | {entry['wikitext']['kld']:.3f} "
            f"/ {entry['c4']['kld']:.3f} | {s['prefill']['mean']:.0f} ± {s['prefill']['sd']:.0f}"
            f" | {s['decode']['mean']:.1f} ± {s['decode']['sd']:.1f} |")
    lines += ["", "search frontier (held-out calibration perplexity, one shot, float):", "",
              "| structure | parameters | GGUF MB at q4_0 | ppl | s |", "|---|--:|--:|--:|--:|"]
    for i, t in enumerate(results["search"]["tried"]):
        mark = " (chosen)" if i == results["search"]["chosen"] else ""
        ppl = f"{t['perplexity']:.2f}" if t["perplexity"] is not None else "not finite"
        lines.append(f"| {t['structure']}{mark} | {t['params']:,} | {t['bytes'] / 1e6:.1f} | "
                     f"{ppl} | {t['seconds']:.0f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
