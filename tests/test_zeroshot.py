"""Local zero-shot task files through lm-evaluation-harness."""

from __future__ import annotations

import json

import pytest
from conftest import SHARED_DATA
from tiny_models import tiny_model

from snapprune import SnapPruneError
from snapprune.zeroshot import evaluate_zeroshot, local_task_config, task_form

ZEROSHOT = SHARED_DATA / "zeroshot"


def test_both_file_forms_are_recognised():
    assert task_form(ZEROSHOT / "arc_easy.jsonl") == "query"
    assert task_form(ZEROSHOT / "boolq.jsonl") == "query"
    assert task_form(ZEROSHOT / "winogrande.jsonl") == "partial"
    doc = json.loads((ZEROSHOT / "winogrande.jsonl").open().readline())
    config = local_task_config(ZEROSHOT / "winogrande.jsonl")
    assert config["doc_to_text"](doc) == doc["gold"]  # lm-eval's multiple-input mode
    assert config["doc_to_choice"](doc) == doc["context_options"]
    assert config["doc_to_target"](doc) == doc["continuation"]


def test_unknown_form_and_missing_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "?", "answer": "!"}) + "\n")
    with pytest.raises(SnapPruneError, match="expected query/choices/gold"):
        local_task_config(bad)
    with pytest.raises(SnapPruneError, match="not found"):
        local_task_config(tmp_path / "missing.jsonl")


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def tiny(smollm2_tokenizer):
    return tiny_model("llama", vocab=len(smollm2_tokenizer)), smollm2_tokenizer


def test_never_seen_task_files_work_unchanged(tmp_path, tiny):
    model, tokenizer = tiny
    query = _write(tmp_path / "colours.jsonl", [
        {"query": "Question: What colour is the clear daytime sky?", "choices": ["blue", "green"],
         "gold": 0},
        {"query": "Question: What colour is fresh grass?", "choices": ["red", "green", "black"],
         "gold": 1},
    ])
    partial = _write(tmp_path / "pronouns.jsonl", [
        {"context_options": ["The cup fell off the table because the cup",
                             "The cup fell off the table because the table"],
         "continuation": "was too close to the edge.", "gold": 0},
    ])
    results = evaluate_zeroshot(model, tokenizer, [str(query), str(partial)], batch_size=2)
    assert set(results) == {"local_colours", "local_pronouns", "mean"}
    assert results["local_colours"]["n"] == 2 and results["local_pronouns"]["n"] == 1
    for name in ("local_colours", "local_pronouns"):
        assert 0.0 <= results[name]["acc"] <= 1.0
    assert "acc_norm" in results["local_colours"]
    assert "acc_norm" not in results["local_pronouns"]  # partial scoring: acc only
    assert results["mean"]["acc_norm"] == pytest.approx(
        (results["local_colours"]["acc_norm"] + results["local_pronouns"]["acc"]) / 2)
    again = evaluate_zeroshot(model, tokenizer, [str(query), str(partial)], batch_size=1)
    assert again == results  # deterministic, batch size irrelevant


def test_shared_task_files_with_limit(tiny):
    model, tokenizer = tiny
    tasks = [str(ZEROSHOT / "arc_easy.jsonl"), str(ZEROSHOT / "winogrande.jsonl")]
    results = evaluate_zeroshot(model, tokenizer, tasks, limit=4)
    assert results["local_arc_easy"]["n"] == 4 and results["local_winogrande"]["n"] == 4


def test_task_directory_expands_to_its_files(tmp_path):
    from snapprune.zeroshot import expand_tasks

    assert expand_tasks([str(ZEROSHOT)]) == sorted(str(p) for p in ZEROSHOT.glob("*.jsonl"))
    assert expand_tasks(["arc_easy"]) == ["arc_easy"]  # a Hub task name passes through
    with pytest.raises(SnapPruneError, match=r"holds no \.jsonl"):
        expand_tasks([str(tmp_path)])
    with pytest.raises(SnapPruneError, match="not found"):
        expand_tasks([str(tmp_path / "gone.jsonl")])
