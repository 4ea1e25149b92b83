"""Local zero-shot task files through lm-evaluation-harness."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_models import tiny_model

from snapprune import SnapPruneError
from snapprune.eval.zeroshot import evaluate_zeroshot, local_task_config, task_form

ZEROSHOT = Path(__file__).parent / "data" / "zeroshot"


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
def tiny(tokenizer):
    return tiny_model("llama", vocab=len(tokenizer)), tokenizer


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
    from snapprune.eval.zeroshot import expand_tasks

    assert expand_tasks([str(ZEROSHOT)]) == sorted(str(p) for p in ZEROSHOT.glob("*.jsonl"))
    assert expand_tasks(["arc_easy"]) == ["arc_easy"]  # a Hub task name passes through
    with pytest.raises(SnapPruneError, match=r"holds no \.jsonl"):
        expand_tasks([str(tmp_path)])
    with pytest.raises(SnapPruneError, match="not found"):
        expand_tasks([str(tmp_path / "gone.jsonl")])


def _reference_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Summed log-probability of ``continuation`` after ``context``, written out by hand
    (the convention of the shared data README: tokenise the pair whole, score the tail)."""
    import torch

    whole = tokenizer.encode(context + continuation)
    head = tokenizer.encode(context)
    tail = whole[len(head):]
    with torch.no_grad():
        logprobs = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
    return sum(logprobs[len(head) - 1 + i, token].item() for i, token in enumerate(tail))


def test_accuracy_matches_a_hand_written_scorer(tmp_path, tiny):
    """Each task file holds one document, so lm-eval's acc is that document's 0/1 verdict:
    compare it, and acc_norm, with choices scored by hand."""
    model, tokenizer = tiny
    query_docs = [json.loads(line) for line in
                  (ZEROSHOT / "arc_easy.jsonl").read_text().splitlines()[:3]]
    query_docs += [json.loads((ZEROSHOT / "piqa.jsonl").open().readline())]
    partial_docs = [json.loads(line) for line in
                    (ZEROSHOT / "winogrande.jsonl").read_text().splitlines()[:2]]
    paths, expected = [], {}
    for i, doc in enumerate(query_docs):
        paths.append(str(_write(tmp_path / f"q{i}.jsonl", [doc])))
        lls = [_reference_loglikelihood(model, tokenizer, doc["query"], " " + c)
               for c in doc["choices"]]
        normed = [ll / len(c) for ll, c in zip(lls, doc["choices"], strict=True)]
        expected[f"local_q{i}"] = {
            "acc": float(max(range(len(lls)), key=lls.__getitem__) == doc["gold"]),
            "acc_norm": float(max(range(len(normed)), key=normed.__getitem__) == doc["gold"])}
    for i, doc in enumerate(partial_docs):
        paths.append(str(_write(tmp_path / f"p{i}.jsonl", [doc])))
        lls = [_reference_loglikelihood(model, tokenizer, ctx, " " + doc["continuation"])
               for ctx in doc["context_options"]]
        expected[f"local_p{i}"] = {"acc": float(max(range(2), key=lls.__getitem__) == doc["gold"])}
    results = evaluate_zeroshot(model, tokenizer, paths, batch_size=4)
    got = {name: {k: v for k, v in row.items() if k != "n"}
           for name, row in results.items() if name != "mean"}
    assert got == expected
    assert len({row["acc"] for row in expected.values()}) == 2  # both verdicts occur
