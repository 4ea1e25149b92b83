"""Calibration and evaluation data: real files through the real loaders."""

from __future__ import annotations

import gzip
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import C4_FILE, WIKI_TEST
from tiny_models import tiny_model

from snapprune import SnapPruneError
from snapprune.data import (
    calibration_windows,
    evaluation_ids,
    read_documents,
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
    assert len(docs) == 1500
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
