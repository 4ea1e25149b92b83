"""Tables and plots of a sweep's ``cells.jsonl``: Markdown per grid, PNG per swept setting."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

from .sweep import DENSE, Cell, SweepPlan, cell_from_record

TABLE_FILE = "results.md"
SETTING_COLUMNS = ("pattern", "sparsity", "alpha", "blocksize", "metric", "calib", "nsamples",
                   "seqlen", "seed", "percdamp")
HEADERS = {"alpha": "α", "blocksize": "block", "nsamples": "calib windows", "seqlen": "calib len",
           "percdamp": "damp", "calib": "calib source"}
# Swept setting -> (file name, axis label, log2 x axis)
PLOTS = {
    "sparsity": ("ppl_vs_sparsity.png", "sparsity (fraction of weights removed)", False),
    "blocksize": ("ppl_vs_blocksize.png", "block size B (columns)", True),
    "alpha": ("ppl_vs_alpha.png", "α (fraction of rows kept dense)", False),
    "nsamples": ("ppl_vs_calib_samples.png", "calibration windows", True),
}


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if value != value:
            return "nan"
        if abs(value) >= 1e5:
            return f"{value:.2e}"
        return f"{value:.{digits}f}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(Path(value).name) if isinstance(value, str) and "/" in value else str(value)


def grid_table(records: list[dict]) -> str:
    """One Markdown table: the settings that vary across ``records``, then the results."""
    cells = [asdict(cell_from_record(r)) for r in records]
    # A column appears when pruned cells differ in it (None: the setting does not apply).
    varying = [c for c in SETTING_COLUMNS
               if len({str(cell[c]) for cell in cells if cell[c] is not None}) > 1]
    sources = sorted({s for r in records for s in r.get("perplexity", {})})
    zeroshot = any("zeroshot" in r for r in records)
    head = ["method", *(HEADERS.get(c, c) for c in varying),
            *(f"ppl {s}" for s in sources)]
    if zeroshot:
        head += ["zero-shot acc", "zero-shot acc_norm"]
    head += ["prune s", "solver s", "layer error"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for record, cell in zip(records, cells, strict=True):
        timing = record.get("timing", {})
        row = [cell["method"], *(_fmt(cell[c]) for c in varying),
               *(_fmt(record["perplexity"].get(s), 2) for s in sources)]
        if zeroshot:
            mean = record.get("zeroshot", {}).get("mean", {})
            row += [_fmt(mean.get("acc")), _fmt(mean.get("acc_norm"))]
        row += [_fmt(timing.get("pruning_seconds"), 1), _fmt(timing.get("solver_seconds"), 1),
                _fmt(record.get("mean_layer_error"), 4)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def zeroshot_table(records: list[dict]) -> str:
    """Per-task accuracy (acc / acc_norm) for the records that have zero-shot results."""
    records = [r for r in records if "zeroshot" in r]
    tasks = [t for t in records[0]["zeroshot"] if t != "mean"] if records else []
    head = ["cell", *(t.removeprefix("local_") for t in tasks), "mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for record in records:
        zs = record["zeroshot"]
        row = [_label(cell_from_record(record))]
        for task in [*tasks, "mean"]:
            acc, norm = zs.get(task, {}).get("acc"), zs.get(task, {}).get("acc_norm")
            row.append(f"{_fmt(acc)} / {_fmt(norm)}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _label(cell: Cell) -> str:
    if cell.method == DENSE:
        return DENSE
    parts = [cell.method, cell.pattern if cell.pattern != "unstructured" else ""]
    if cell.pattern in ("unstructured", "structured"):
        parts.append(f"{cell.sparsity:g}")
    if cell.alpha:
        parts.append(f"α={cell.alpha:g}")
    return " ".join(p for p in parts if p)


def _task_names(tasks: list[str]) -> list[str]:
    from .errors import SnapPruneError
    from .eval.zeroshot import expand_tasks

    with contextlib.suppress(SnapPruneError):  # rendering elsewhere than the sweep ran
        tasks = expand_tasks(tasks)
    return [Path(t).stem for t in tasks]


def render_markdown(plan: SweepPlan | None, records: dict[str, dict]) -> str:
    """The whole report: one section per grid (in the plan's order, or one table of all)."""
    sections = ["# Sweep results", ""]
    if plan is not None:
        ev = plan.evaluation
        sections += [f"Model: `{plan.model}`. Perplexity: "
                     f"{', '.join(Path(s).name for s in ev.sources())}"
                     f", windows of {ev.seqlen} tokens, at most {ev.max_windows or 'all'}"
                     " windows. "
                     + (f"Zero-shot: {', '.join(_task_names(ev.zeroshot))}, at most "
                        f"{ev.limit or 'all'} examples per task." if ev.zeroshot else ""), ""]
        groups = []
        for grid in plan.grids:
            rows = [records[plan.key(c)] for c in grid.cells if plan.key(c) in records]
            groups.append((grid.name, rows, len(grid.cells)))
    else:
        groups = [("all cells", list(records.values()), len(records))]
    for name, rows, total in groups:
        sections += [f"## {name}", "", f"{len(rows)} of {total} cells finished.", ""]
        if rows:
            sections += [grid_table(rows), ""]
            if any("zeroshot" in r for r in rows):
                sections += ["Zero-shot accuracy per task (acc / acc_norm):", "",
                             zeroshot_table(rows), ""]
    return "\n".join(sections)


def _series(records: list[dict], axis: str, source: str) -> dict[tuple, list[tuple]]:
    """Lines for a plot against ``axis``: records equal in every other setting form a line."""
    lines: dict[tuple, list[tuple]] = defaultdict(list)
    for record in records:
        cell = asdict(cell_from_record(record))
        if cell["method"] == DENSE or cell[axis] is None or source not in record["perplexity"]:
            continue
        rest = tuple((k, cell[k]) for k in ("method", *SETTING_COLUMNS) if k != axis)
        lines[rest].append((cell[axis], record["perplexity"][source]))
    return {k: sorted(v) for k, v in lines.items() if len({x for x, _ in v}) >= 2}


def _series_label(key: tuple, keys: list[tuple]) -> str:
    """The method, plus the settings (not applying = None ignored) that tell apart the lines
    of the same method."""
    method = key[0][1]
    siblings = [k for k in keys if k[0][1] == method]
    extra = [f"{HEADERS.get(name, name)} {_fmt(value)}" for i, (name, value) in enumerate(key)
             if i and len({k[i][1] for k in siblings}) > 1]
    return ", ".join([method, *extra])


def plot_against(records: list[dict], axis: str, source: str, path: Path) -> bool:
    """Perplexity against one swept setting, a line per method (and per other setting that
    differs between lines). Returns False when the sweep holds no such series."""
    series = _series(records, axis, source)
    if not series:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(series)
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    _, xlabel, log2 = PLOTS[axis]
    for key in keys:
        xs, ys = zip(*series[key], strict=True)
        label = _series_label(key, keys)
        ax.plot(xs, ys, marker="o", label=label)
    dense = [r["perplexity"][source] for r in records
             if r["cell"]["method"] == DENSE and source in r["perplexity"]]
    if dense:
        ax.axhline(dense[0], color="grey", linestyle="--", label=f"dense {dense[0]:.2f}")
    ax.set_yscale("log")
    if log2:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"perplexity ({source}, log scale)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    partial = path.with_name(f".{path.stem}.partial.png")
    fig.savefig(partial)
    plt.close(fig)
    partial.replace(path)
    return True


def render(out_dir: str | Path, records: dict[str, dict], plan: SweepPlan | None = None,
           plots: bool = True) -> list[Path]:
    """Write ``results.md`` and the plots into ``out_dir``; return the files written."""
    from .outputs import write_text_atomic

    out_dir = Path(out_dir)
    written = [out_dir / TABLE_FILE]
    write_text_atomic(written[0], render_markdown(plan, records))
    if plots and records:
        rows = list(records.values())
        sources = sorted({s for r in rows for s in r.get("perplexity", {})})
        for axis, (filename, _, _) in PLOTS.items():
            if sources and plot_against(rows, axis, sources[0], out_dir / filename):
                written.append(out_dir / filename)
    return written
