"""SmolLM2-135M pruned one-shot, then recovered: perplexity (WikiText-2, the C4 tail) and the
local zero-shot tasks before and after, the held-out curve against tokens, distillation
against plain LM fine-tuning at equal tokens, greedy samples before and after.

    python benchmarks/recovery_table.py --students runs/rec --data runs/rec/c4_train.txt \
        --out runs/rec/table [--runs NAME ...]

Students (made by ``snapprune prune/shrink ... --out runs/rec/NAME``, see docs/recovery.md):
``p24`` (Thanos 2:4), ``p50`` (Thanos 50%), ``s30`` (shrink MLP 30% + heads 9 → 6). The
training text is the first 1,000 documents of the local C4 validation file
(``benchmarks/c4_split.py``), joined into one stream; the C4 tail evaluated is its last 500
(``c4-sample-eval``), and snapprune checks that no training window shares text with the
evaluated windows. Every run goes through the one run path (``run.execute``); each finished
run is appended to ``OUT/cells.jsonl`` and its recovered model kept in ``OUT/NAME``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from snapprune.jobs import EvaluationSpec, Job, OutputSpec
from snapprune.models.settings import RecoverSettings
from snapprune.recovery import checkpoint_dir_for, saved_step
from snapprune.run import execute

RUNS = {
    # name: (student, tokens, loss, lr, zero-shot); lr 3e-4 chosen by a pilot on p24 (16k
    # tokens: held-out perplexity 100.5 at 1e-4, 90.7 at 3e-4, 94.8 at 1e-3; docs/recovery.md)
    "p24-kd-262k": ("p24", 262_144, "kd", 3e-4, True),
    "s30-kd-262k": ("s30", 262_144, "kd", 3e-4, True),
    "p24-kd-65k": ("p24", 65_536, "kd", 3e-4, False),
    "p24-lm-65k": ("p24", 65_536, "lm", 3e-4, False),
    "p50-kd-131k": ("p50", 131_072, "kd", 3e-4, True),
    # the budgets this machine's session could afford beside the rest (see docs/recovery.md)
    "s30-kd-131k": ("s30", 131_072, "kd", 3e-4, False),
    "p24-kd-32k": ("p24", 32_768, "kd", 3e-4, False),  # KD against LM, equal tokens
    "p24-lm-32k": ("p24", 32_768, "lm", 3e-4, False),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--students", type=Path, default=Path("runs/rec"))
    parser.add_argument("--data", type=Path, default=Path("runs/rec/c4_train.txt"))
    parser.add_argument("--out", type=Path, default=Path("runs/rec/table"))
    parser.add_argument("--runs", nargs="*", default=list(RUNS))
    parser.add_argument("--zeroshot", default="../shared/data/zeroshot")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--eval-every", type=int, default=16)
    parser.add_argument("--render", action="store_true",
                        help="only print the Markdown table of OUT/cells.jsonl")
    parser.add_argument("--no-before", action="store_true",
                        help="skip evaluating the student before training (its own report "
                             "has it)")
    args = parser.parse_args()
    cells = args.out / "cells.jsonl"
    if args.render:
        print(render(cells, args.students))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    done = {json.loads(line)["name"] for line in cells.read_text().splitlines()} \
        if cells.is_file() else set()
    from snapprune.eval.zeroshot import expand_tasks

    tasks = tuple(expand_tasks([args.zeroshot])) if args.zeroshot else ()
    for name in args.runs:
        if name in done:
            continue
        student, tokens, loss, lr, zeroshot = RUNS[name]
        settings = RecoverSettings(tokens=tokens, data=str(args.data), seqlen=512, batch_size=4,
                                   lr=lr, loss=loss, eval_every=args.eval_every,
                                   eval_windows=4)
        job = Job(model=str(args.students / student), steps=(settings,),
                  evaluation=EvaluationSpec(ppl=("wikitext2-test", "c4-sample-eval"),
                                            seqlen=1024, max_windows=args.windows,
                                            zeroshot=tasks if zeroshot else (),
                                            dense=not args.no_before,
                                            limit=args.limit),
                  output=OutputSpec(samples=True))
        out = args.out / name
        stopped = saved_step(checkpoint_dir_for(out.resolve()))  # a killed run continues
        outcome = execute(job, out, overwrite=True, resume=stopped is not None, progress=False,
                          log=print)
        report = outcome.report
        record = {"name": name, "student": student, "tokens": tokens, "loss": loss, "lr": lr,
                  "windows": args.windows,
                  "before": {k: v["perplexity"]
                             for k, v in (report.get("dense_perplexity") or {}).items()},
                  "after": {k: v["perplexity"] for k, v in report["perplexity"].items()},
                  "zeroshot": report.get("zeroshot"),
                  "recovery": {k: report["recovery"][k]
                               for k in ("tokens", "seconds", "tokens_per_second",
                                         "structure_kept", "frozen_zeros",
                                         "heldout_perplexity", "loss_curve")},
                  "generations": report.get("generations")}
        with cells.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        print(json.dumps({k: record[k] for k in ("name", "before", "after")}), flush=True)
    return 0


STUDENT_WINDOWS = 40
"""Windows of 1,024 tokens the students and the dense model were evaluated on."""


def _perplexities(report: dict, key: str) -> dict[str, float]:
    return {k: v["perplexity"] for k, v in (report.get(key) or {}).items()}


def render(cells: Path, students: Path) -> str:
    """One row per run: perplexity before → after on each text, the share of the gap to dense
    that recovery closed, and the training throughput. "Before" and dense come from the
    students' own reports (same windows) where a run did not measure them."""
    records = [json.loads(line) for line in cells.read_text().splitlines() if line.strip()]
    reports = {}
    for record in records:
        path = students / record["student"] / "snapprune_report.json"
        if record["student"] not in reports and path.is_file():
            reports[record["student"]] = json.loads(path.read_text())
    dense = next((_perplexities(r, "dense_perplexity") for r in reports.values()
                  if r.get("dense_perplexity")), {})
    texts = ("wikitext2-test", "c4-sample-eval")
    lines = ["| run | loss | tokens | " + " | ".join(
        f"{t}: before → after (gap closed)" for t in texts) + " | tokens/s | minutes |",
             "|---|---|--:|" + "---|" * len(texts) + "--:|--:|"]
    for r in records:
        before = r["before"] or _perplexities(reports.get(r["student"], {}), "perplexity")
        cells_ = []
        for text in texts:
            b, a, d = before.get(text), r["after"].get(text), dense.get(text)
            same = r.get("windows", STUDENT_WINDOWS) == STUDENT_WINDOWS  # dense's windows
            closed = f" ({(b - a) / (b - d):.0%})" if same and None not in (b, a, d) else ""
            cells_.append(f"{b:.2f} → **{a:.2f}**{closed}" if b is not None else f"{a:.2f}")
        rec = r["recovery"]
        lines.append(f"| {r['name']} | {r['loss']} | {r['tokens']:,} | " + " | ".join(cells_)
                     + f" | {rec['tokens_per_second']:.0f} | {rec['seconds'] / 60:.1f} |")
    dense_cells = " | ".join(f"{dense[t]:.2f}" for t in texts if t in dense)
    return "\n".join(lines) + (f"\n\ndense: {dense_cells}" if dense else "")


if __name__ == "__main__":
    raise SystemExit(main())
