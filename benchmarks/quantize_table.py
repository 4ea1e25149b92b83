"""SmolLM2-135M quantised: GPTQ against round-to-nearest on several grids, joint with pruning
and shrinking, evaluated in transformers (de-quantised weights) on WikiText-2 and the C4 tail.

    python benchmarks/quantize_table.py --out runs/quant [--seeds 0,1,2] [--windows 40]
        [--only NAME ...]

Every row runs through the one run path (``run.execute``) on one loaded model, its dense
weights restored before each row; rows written as GGUF keep their file (``OUT/files/NAME``)
for ``benchmarks/runtime.py``. Results are appended to ``OUT/cells.jsonl`` as rows finish, so
an interrupted table resumes; ``--render`` prints the Markdown table of a finished one.

Grids: the model's weights come from a Q4_1 file (a 4-bit, block-32, asymmetric grid), where
round-to-nearest ``q4_1`` reproduces them almost exactly and cannot tell quantisers apart;
the rows use grids that differ from it (``q4_0``, ``w4g128`` symmetric — SmolLM2's 576-wide
layers end in a 64-wide group —, 3 bits, ``q8_0``) and pruned or shrunk weights, which the
solvers moved off the grid.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from snapprune.jobs import CalibrationSpec, EvaluationSpec, Job, OutputSpec
from snapprune.models.loading import load_model
from snapprune.models.settings import PruneSettings, QuantizeSettings, ShrinkSettings
from snapprune.run import execute
from snapprune.workbench import Workbench


def evaluation(windows: int) -> EvaluationSpec:
    return EvaluationSpec(ppl=("wikitext2-test", "c4-sample-eval"), seqlen=1024,
                          max_windows=windows, dense=False)


@dataclass(frozen=True)
class Row:
    name: str
    label: str
    steps: tuple
    format: str = "hf"
    seeded: bool = True
    """Whether calibration enters the result (repeated over the seeds)."""


def _q(scheme: str, method: str = "gptq", act_order: bool = False) -> QuantizeSettings:
    return QuantizeSettings(scheme=scheme, method=method, act_order=act_order)


SHRINK = ShrinkSettings("thanos", mlp=0.3, heads=0.34)
ROWS = (
    Row("dense", "dense (float32, the Q4_1 file de-quantised)", (), seeded=False),
    Row("rtn-q4_0", "RTN q4_0", (_q("q4_0", "rtn"),), "gguf", seeded=False),
    Row("gptq-q4_0", "GPTQ q4_0", (_q("q4_0"),), "gguf"),
    Row("gptq-q4_0-act", "GPTQ q4_0, act order", (_q("q4_0", act_order=True),), "gguf"),
    Row("rtn-w4g128", "RTN w4g128", (_q("w4g128", "rtn"),), seeded=False),
    Row("gptq-w4g128", "GPTQ w4g128", (_q("w4g128"),)),
    Row("gptq-w4g128-act", "GPTQ w4g128, act order", (_q("w4g128", act_order=True),)),
    Row("rtn-w3g128", "RTN w3g128", (_q("w3g128", "rtn"),), seeded=False),
    Row("gptq-w3g128", "GPTQ w3g128", (_q("w3g128"),)),
    Row("rtn-q8_0", "RTN q8_0", (_q("q8_0", "rtn"),), "gguf", seeded=False),
    Row("gptq-q8_0", "GPTQ q8_0", (_q("q8_0"),), "gguf"),
    Row("thanos50", "Thanos 50% (no quantisation)", (PruneSettings("thanos", sparsity=0.5),)),
    Row("thanos50-rtn-q4_0", "Thanos 50%, then RTN q4_0",
        (PruneSettings("thanos", sparsity=0.5), _q("q4_0", "rtn")), "gguf"),
    Row("thanos50-gptq-q4_0", "Thanos 50% + GPTQ q4_0 (joint)",
        (PruneSettings("thanos", sparsity=0.5), _q("q4_0")), "gguf"),
    Row("thanos24-gptq-q4_0", "Thanos 2:4 + GPTQ q4_0 (joint)",
        (PruneSettings("thanos", "2:4"), _q("q4_0")), "gguf"),
    Row("shrink", "shrink MLP 30% + heads 9→6, float", (SHRINK,), "gguf"),
    Row("shrink-gptq-q4_0", "shrink MLP 30% + heads 9→6 + GPTQ q4_0 (joint)",
        (SHRINK, _q("q4_0")), "gguf"),
    Row("shrink-rtn-q4_0", "shrink MLP 30% + heads 9→6, then RTN q4_0",
        (SHRINK, _q("q4_0", "rtn")), "gguf"),
)


def done_keys(path: Path) -> set[tuple[str, int]]:
    if not path.is_file():
        return set()
    return {(r["name"], r["seed"]) for r in map(json.loads, path.read_text().splitlines())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/quant"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--windows", type=int, default=40,
                        help="evaluation windows of 1,024 tokens per text")
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--render", action="store_true")
    args = parser.parse_args()
    cells = args.out / "cells.jsonl"
    if args.render:
        print(render(cells))
        return 0
    (args.out / "files").mkdir(parents=True, exist_ok=True)
    done = done_keys(cells)
    model, tokenizer, _ = load_model("smollm2-135m", progress=False)
    dense = copy.deepcopy(model)
    seeds = [int(s) for s in args.seeds.split(",")]
    for row in ROWS:
        if args.only and row.name not in args.only:
            continue
        for seed in seeds if row.seeded else seeds[:1]:
            if (row.name, seed) in done:
                continue
            bench = Workbench(copy.deepcopy(dense), tokenizer, progress=False)
            job = Job(model="smollm2-135m", steps=row.steps,
                      calibration=CalibrationSpec("c4-sample", args.nsamples, args.seqlen, seed),
                      evaluation=evaluation(args.windows),
                      output=OutputSpec(format=row.format, samples=False))
            out = args.out / "files" / (row.name if seed == seeds[0] else f"{row.name}-s{seed}")
            t = time.perf_counter()
            outcome = execute(job, out if row.format == "gguf" else None, bench=bench,
                              overwrite=True, progress=False, announce=False)
            record = {"name": row.name, "label": row.label, "seed": seed,
                      "perplexity": {k: v.perplexity
                                     for k, v in outcome.evaluated.perplexity.items()},
                      "files": outcome.report.get("files", {}),
                      "quantization": {k: outcome.report["quantization"][k]
                                       for k in ("scheme", "bits_per_weight",
                                                 "mean_layer_error", "seconds")}
                      if "quantization" in outcome.report else None,
                      "parameters": sum(p.numel() for p in outcome.model.parameters()),
                      "seconds": time.perf_counter() - t}
            with cells.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            print(json.dumps({k: record[k] for k in ("name", "seed", "perplexity")}), flush=True)
    print(render(cells))
    return 0


def render(cells: Path) -> str:
    """Mean ± standard deviation over seeds (one value where one seed ran)."""
    rows = [json.loads(line) for line in cells.read_text().splitlines() if line.strip()]
    order = [r.name for r in ROWS]
    by_name: dict[str, list[dict]] = {}
    for r in rows:
        by_name.setdefault(r["name"], []).append(r)
    texts = list(rows[0]["perplexity"])
    lines = ["| model | " + " | ".join(f"{t} ppl" for t in texts)
             + " | bits per weight | GPTQ's mean layer error | seeds |",
             "|---|" + "---|" * (len(texts) + 3)]
    for name in sorted(by_name, key=order.index):
        group = by_name[name]
        cells_ = []
        for text in texts:
            values = [r["perplexity"][text] for r in group]
            cells_.append(f"{values[0]:.2f}" if len(values) == 1 else
                          f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}")
        q = group[0]["quantization"] or {}
        bits = f"{q['bits_per_weight']:g}" if q else "–"
        error = q.get("mean_layer_error")
        gptq = any(isinstance(step, QuantizeSettings) and step.method == "gptq"
                   for row in ROWS if row.name == name for step in row.steps)
        errors = [r["quantization"]["mean_layer_error"] for r in group
                  if gptq and r["quantization"]
                  and r["quantization"]["mean_layer_error"] is not None]
        error = f"{statistics.mean(errors):.4f}" if errors else "–"
        lines.append(f"| {group[0]['label']} | " + " | ".join(cells_)
                     + f" | {bits} | {error} | {len(group)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
