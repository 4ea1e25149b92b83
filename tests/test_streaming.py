"""Models larger than memory: streamed pruning equals in-memory pruning, and resumes exactly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import C4_FILE
from safetensors.torch import load_file
from test_cli import _run
from tiny_models import tiny_model, token_batch
from transformers import AutoModelForCausalLM, AutoTokenizer

from snapprune.models import streaming
from snapprune.models.prune import prune_model
from snapprune.models.settings import PruneSettings
from snapprune.models.streaming import CRASH_ENV, partial_dir, should_stream, stream_prune


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(path))
    return out


@pytest.mark.parametrize("family,pattern", [("llama", "unstructured"), ("gpt2", "2:4"),
                                            ("opt", "structured")])
def test_streamed_equals_in_memory(family, pattern, tmp_path):
    source = tmp_path / "source"
    tiny_model(family).save_pretrained(source, max_shard_size="100KB")
    ids = token_batch(4, 32)
    settings = PruneSettings("thanos", pattern, None if ":" in pattern else 0.4)
    run = stream_prune(source, tmp_path / "out", lambda _model: ids, settings, progress=False,
                       batch_size=3)
    reference = tiny_model(family)
    expected = prune_model(reference, ids, settings, progress=False, batch_size=3)
    state = reference.state_dict()
    got = _tensors(tmp_path / "out")
    assert got and all(torch.equal(t, state[n]) for n, t in got.items())
    assert [r.error for r in run.layers] == [r.error for r in expected.layers]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids[:1]).logits, reference(ids[:1]).logits)
    assert not partial_dir((tmp_path / "out").resolve()).exists()


@pytest.fixture
def sharded_dir(tmp_path, tiny_dir):
    """The CLI's tiny LLaMA (real tokenizer) saved in several safetensors shards."""
    out = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_dir).save_pretrained(out, max_shard_size="200KB")
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(out)
    return out


def _cli_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["prune", "--model", str(model), "--method", "thanos", "--pattern", "2:4", "--calib",
            str(C4_FILE), "--nsamples", "2", "--seqlen", "64", "--out", str(out), "--stream",
            "--quiet", *extra]


def _cli(model: Path, out: Path, *extra: str, env: dict | None = None):
    args = [sys.executable, "-m", "snapprune", *_cli_args(model, out, *extra)]
    return subprocess.run(args, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_killed_run_resumes_to_byte_identical_output(sharded_dir, tmp_path, capsys,
                                                     one_thread):
    whole = tmp_path / "whole"
    code, err = _run(capsys, *_cli_args(sharded_dir, whole))
    assert code == 0, err

    out = tmp_path / "resumed"
    killed = _cli(sharded_dir, out, env={CRASH_ENV: "1"})  # a process of its own, killed
    assert killed.returncode == -9, killed.stderr  # SIGKILL, as kill -9
    assert not out.exists() and (partial_dir(out) / streaming.STATE_NAME).is_file()
    code, err = _run(capsys, *_cli_args(sharded_dir, out, "--resume"))
    assert code == 0, err
    assert not partial_dir(out).exists()
    shards = sorted(p.name for p in whole.glob("*.safetensors"))
    assert shards == sorted(p.name for p in out.glob("*.safetensors")) and len(shards) == 4
    for name in shards:
        assert (whole / name).read_bytes() == (out / name).read_bytes(), name
    report = (out / "snapprune_report.json").read_text()
    assert '"streamed": true' in report


@pytest.mark.parametrize("extra,fragment", [
    (["--eval", str(C4_FILE)], "never whole in memory"),
    (["--resume"], "nothing to resume"),
    (["--calib", "self"], "self generates text"),
])
def test_streaming_refusals(sharded_dir, tmp_path, capsys, extra, fragment):
    out = tmp_path / "out"
    args = ["prune", "--model", sharded_dir, "--method", "wanda", "--sparsity", 0.5, "--calib",
            C4_FILE, "--nsamples", 1, "--seqlen", 16, "--out", out, "--stream", "--quiet"]
    code, err = _run(capsys, *args, *extra)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and fragment in lines[0], err
    assert not out.exists() and not partial_dir(out.resolve()).exists()


def test_gguf_is_refused_and_large_models_stream_by_themselves(sharded_dir, tmp_path, capsys,
                                                               monkeypatch, smollm2_wheel):
    code, err = _run(capsys, "prune", "--model", "smollm2-135m", "--method", "wanda",
                     "--sparsity", 0.5, "--calib", C4_FILE, "--out", tmp_path / "o", "--stream")
    assert code == 2 and "convert the GGUF file first" in err
    assert not should_stream(sharded_dir)
    monkeypatch.setattr(streaming, "available_bytes", lambda: 1024)
    assert should_stream(sharded_dir)
