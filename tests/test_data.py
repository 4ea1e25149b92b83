"""Calibration and evaluation data: real files through the real loaders."""

from __future__ import annotations

import gzip
import hashlib
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import C4_FILE, WIKI_TEST
from tiny_models import tiny_model

from snapprune import SnapPruneError
from snapprune.data import (
    SOURCES,
    calibration_windows,
    check_source,
    evaluation_ids,
    read_documents,
    resolve_calibration_source,
    sample_path,
    self_generated_windows,
    wikitext_join,
)
from snapprune.eval.perplexity import perplexity


def test_c4_windows_are_seeded_and_from_long_documents(smollm2_tokenizer):
    a = calibration_windows(str(C4_FILE), smollm2_tokenizer, nsamples=6, seqlen=256, seed=0)
    b = calibration_windows(str(C4_FILE), smollm2_tokenizer, nsamples=6, seqlen=256, seed=0)
    c = calibration_windows(str(C4_FILE), smollm2_tokenizer, nsamples=6, seqlen=256, seed=1)
    assert a.shape == (6, 256) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    docs = read_documents(C4_FILE)
    assert len(docs) == 319
    # Each window is a contiguous piece of one document's tokens.
    text = smollm2_tokenizer.decode(a[0])
    assert any(text[:40] in d for d in docs)


def test_text_file_windows_and_too_little_text(tmp_path, smollm2_tokenizer):
    small = tmp_path / "small.txt"
    small.write_text("just a few words of text here.\r\n" * 20)
    ids = calibration_windows(str(small), smollm2_tokenizer, nsamples=2, seqlen=32)
    assert ids.shape == (2, 32)
    with pytest.raises(SnapPruneError, match="too little text"):
        calibration_windows(str(small), smollm2_tokenizer, nsamples=64, seqlen=64)
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"text": "short doc"}) for _ in range(5)))
    with pytest.raises(SnapPruneError, match="too little text"):
        calibration_windows(str(docs), smollm2_tokenizer, nsamples=2, seqlen=64)


def test_bad_files(tmp_path, smollm2_tokenizer):
    with pytest.raises(SnapPruneError, match="not found"):
        calibration_windows(str(tmp_path / "nope.jsonl"), smollm2_tokenizer, nsamples=1,
                            seqlen=8)
    bad = tmp_path / "bad.jsonl.gz"
    with gzip.open(bad, "wt") as handle:
        handle.write(json.dumps({"content": "no text field"}) + "\n")
    with pytest.raises(SnapPruneError, match="'text' field"):
        read_documents(bad)


def test_wikitext_join_matches_the_hub_layout():
    raw = " = Title = \r\n First paragraph . \r\n Second one . \r\n"
    assert wikitext_join(raw) == " = Title = \n\n\n First paragraph . \n\n\n Second one . \n"


def test_wikitext_test_file_tokens(smollm2_tokenizer):
    ids = evaluation_ids(str(WIKI_TEST), smollm2_tokenizer)
    assert 250_000 < ids.numel() < 350_000


def test_perplexity_matches_a_direct_computation():
    model = tiny_model("llama")
    ids = torch.randint(0, 512, (200,), generator=torch.Generator().manual_seed(0))
    result = perplexity(model, ids, seqlen=64, progress=False)
    assert result.windows == 3 and result.tokens == 3 * 63
    nll = 0.0
    with torch.no_grad():
        for i in range(3):
            w = ids[i * 64 : (i + 1) * 64]
            nll += F.cross_entropy(model(w[None]).logits[0, :-1], w[1:], reduction="sum").item()
    assert result.perplexity == pytest.approx(math.exp(nll / (3 * 63)), rel=1e-5)
    assert perplexity(model, ids, seqlen=64, max_windows=1, progress=False).windows == 1
    with pytest.raises(SnapPruneError, match="less than one window"):
        perplexity(model, ids[:10], seqlen=64, progress=False)


def test_self_generated_windows_are_seeded(smollm2_tokenizer):
    model = tiny_model("llama", vocab=len(smollm2_tokenizer))
    a = self_generated_windows(model, smollm2_tokenizer, nsamples=2, seqlen=12, seed=5)
    b = self_generated_windows(model, smollm2_tokenizer, nsamples=2, seqlen=12, seed=5)
    assert a.shape == (2, 12) and torch.equal(a, b)
    assert len(set(a.flatten().tolist())) > 4  # sampled text, not a constant


WIKITEXT_TEST_SHA256 = "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c"
"""The project's shared copy of WikiText-2 test (../shared/data/README.md)."""


def test_bundled_samples_are_small_licensed_and_disjoint():
    files = [sample_path(s.sample_file) for s in SOURCES.values() if s.sample_file]
    assert len(files) == 3
    assert sum(f.stat().st_size for f in files) < 2_000_000  # the wheel's data budget
    folder = files[0].parent
    notices = {p.name: p.read_text() for p in folder.glob("*.NOTICE.txt")}
    assert "ODC-BY" in notices["C4.NOTICE.txt"]
    assert "CC BY-SA 3.0" in notices["WikiText-2.NOTICE.txt"]
    calibration = read_documents(sample_path("c4-calibration.jsonl.gz"))
    evaluation = read_documents(sample_path("c4-evaluation.jsonl.gz"))
    assert (len(calibration), len(evaluation)) == (319, 500)
    assert not set(calibration) & set(evaluation)  # no document in both slices
    assert all(len(d) >= 2000 for d in calibration)
    with gzip.open(sample_path("wikitext-2-test.raw.gz"), "rb") as handle:
        assert hashlib.sha256(handle.read()).hexdigest() == WIKITEXT_TEST_SHA256


def test_bundled_sources_by_name(smollm2_tokenizer):
    ids = calibration_windows("c4-sample", smollm2_tokenizer, nsamples=4, seqlen=512, seed=0)
    assert ids.shape == (4, 512)
    assert torch.equal(ids, calibration_windows(str(C4_FILE), smollm2_tokenizer, nsamples=4,
                                                seqlen=512, seed=0))
    tail = evaluation_ids("c4-sample-eval", smollm2_tokenizer)
    assert 200_000 < tail.numel() < 400_000
    # Each source serves what it is for, and says so in one line otherwise.
    with pytest.raises(SnapPruneError, match="not a calibration source"):
        check_source("wikitext2-test", calibration=True)
    with pytest.raises(SnapPruneError, match="not an evaluation source"):
        check_source("c4-sample", calibration=False)
    with pytest.raises(SnapPruneError, match="not a calibration source"):
        calibration_windows("c4-sample-eval", smollm2_tokenizer, nsamples=1, seqlen=8)


def test_auto_calibration_is_the_bundled_sample_without_the_hub(monkeypatch):
    from snapprune import hub

    monkeypatch.setattr(hub, "unreachable_reason", lambda: "offline mode is set")
    monkeypatch.setattr("snapprune.data.unreachable_reason", lambda: "offline mode is set")
    source, note = resolve_calibration_source("auto")
    assert source == "c4-sample" and "bundled C4 sample" in note and "\n" not in note
    monkeypatch.setattr("snapprune.data.unreachable_reason", lambda: None)
    assert resolve_calibration_source("auto") == ("c4", None)
    assert resolve_calibration_source("mine.txt") == ("mine.txt", None)
