"""Zero-shot multiple-choice accuracy through lm-evaluation-harness.

Tasks are Hub task names (``arc_easy``, ``piqa``, …, when the network is there) or local JSON
lines files in one of two forms, turned into lm-eval task definitions on the fly:

- ``{"query": ..., "choices": [...], "gold": i}``: each choice scored as a continuation of the
  query after one space (ARC, PIQA, BoolQ, OpenBookQA);
- ``{"context_options": [...], "continuation": ..., "gold": i}``: the continuation scored after
  each context (WinoGrande's partial scoring).

``acc`` sums the choice's token log-likelihoods; ``acc_norm`` divides by its length in
characters (lm-eval's definitions).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import SnapPruneError
from ..progress import library_bars

QUERY_FORM = ("query", "choices", "gold")
PARTIAL_FORM = ("context_options", "continuation", "gold")


def _first_record(path: Path) -> dict:
    try:
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    record = json.loads(line)
                    if isinstance(record, dict):
                        return record
                    break
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SnapPruneError(f"cannot read task file {path}: {exc}") from exc
    raise SnapPruneError(f"task file {path} holds no JSON object per line")


def task_form(path: Path) -> str:
    """``"query"`` or ``"partial"``, from the fields of the file's first record."""
    keys = set(_first_record(path))
    if keys >= set(QUERY_FORM):
        return "query"
    if keys >= set(PARTIAL_FORM):
        return "partial"
    raise SnapPruneError(
        f"task file {path} has fields {sorted(keys)}; expected query/choices/gold or "
        "context_options/continuation/gold"
    )


def _query_text(doc: dict) -> str:
    return doc["query"]


def _query_choices(doc: dict) -> list[str]:
    return list(doc["choices"])


def _gold(doc: dict) -> int:
    return int(doc["gold"])


def _partial_contexts(doc: dict) -> list[str]:
    return list(doc["context_options"])


def _partial_continuation(doc: dict) -> str:
    return doc["continuation"]


def local_task_config(path: str | Path, name: str | None = None) -> dict:
    """An lm-eval task definition (a dict, as its YAML files hold) for a local task file."""
    path = Path(path)
    if not path.is_file():
        raise SnapPruneError(f"task file {path} not found")
    form = task_form(path)
    config = {
        "task": name or f"local_{path.stem}",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path.resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "target_delimiter": " ",
        # Partial scoring compares one continuation after different contexts: a length
        # normalisation of the choices (the contexts) means nothing there, so acc only.
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            *([{"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]
              if form == "query" else []),
        ],
        "metadata": {"version": 1.0},
    }
    if form == "query":
        config.update(doc_to_text=_query_text, doc_to_choice=_query_choices, doc_to_target=_gold)
    else:
        # lm-eval's multiple-input mode: doc_to_text gives the gold index, the choices are the
        # contexts, and the one shared continuation is scored after each of them.
        config.update(doc_to_text=_gold, doc_to_choice=_partial_contexts,
                      doc_to_target=_partial_continuation)
    return config


def expand_tasks(tasks: list[str]) -> list[str]:
    """Task names and files as given; a directory stands for every ``*.jsonl`` file in it."""
    expanded: list[str] = []
    for task in tasks:
        path = Path(task)
        if path.is_dir():
            files = sorted(str(f) for f in path.glob("*.jsonl"))
            if not files:
                raise SnapPruneError(f"task directory {path} holds no .jsonl task files")
            expanded.extend(files)
        elif task.endswith((".jsonl", ".json")) and not path.is_file():
            raise SnapPruneError(f"task file {task} not found")
        else:
            expanded.append(task)
    return expanded


def _harness_model(base, progress: bool):
    """lm-eval's HF wrapper with its own ``disable_tqdm`` switch set from ``progress``."""
    if progress:
        return base

    class Quiet(base):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=True)

    return Quiet


def evaluate_zeroshot(
    model,
    tokenizer,
    tasks: list[str],
    *,
    limit: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Accuracy per task (``acc``, ``acc_norm`` where defined, ``n``) and their ``mean``.

    ``model`` is evaluated in memory (lm-eval's ``HFLM`` wrapper), so a pruned model needs no
    saving first.
    """
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:
        raise SnapPruneError(
            "zero-shot evaluation needs lm-evaluation-harness: pip install 'snapprune[eval]'"
        ) from exc
    from lm_eval.tasks import TaskManager

    specs, names = [], []
    for task in expand_tasks(tasks):
        if Path(task).suffix in (".jsonl", ".json") or Path(task).exists():
            config = local_task_config(task)
            specs.append(config)
            names.append(config["task"])
        else:
            specs.append(task)
            names.append(task)
    lm = _harness_model(HFLM, progress)(pretrained=model, tokenizer=tokenizer,
                                         batch_size=batch_size, device=device)
    try:
        with library_bars(progress):
            # Indexing lm-eval's own task library takes seconds; local files need none of it.
            manager = TaskManager(include_defaults=any(isinstance(t, str) for t in specs))
            output = simple_evaluate(
                model=lm, tasks=specs, num_fewshot=0, limit=limit, bootstrap_iters=0,
                task_manager=manager,
                log_samples=False, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                fewshot_random_seed=0)
    except Exception as exc:  # unknown Hub task, no network: one line for the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SnapPruneError(f"zero-shot evaluation failed: {first}") from exc
    results: dict[str, dict[str, float]] = {}
    for name in names:
        metrics = output["results"].get(name, {})
        row = {key.split(",")[0]: float(value) for key, value in metrics.items()
               if key.split(",")[0] in ("acc", "acc_norm")}
        row["n"] = int(output.get("n-samples", {}).get(name, {}).get("effective", 0))
        results[name] = row
    scored = [r for r in results.values() if "acc" in r]
    results["mean"] = {
        "acc": sum(r["acc"] for r in scored) / len(scored) if scored else float("nan"),
        # WinoGrande-style tasks define no acc_norm: their acc stands in, as is customary.
        "acc_norm": sum(r.get("acc_norm", r["acc"]) for r in scored) / len(scored)
        if scored else float("nan"),
    }
    return results
