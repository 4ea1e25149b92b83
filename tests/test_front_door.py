"""What a new user meets first: offline refusals in seconds, the cost said up front, sample
generations, and a quiet --quiet."""

from __future__ import annotations

import json
import socket
import time

import pytest
from conftest import C4_FILE, WIKI_TEST
from test_cli import _run

from snapprune import hub
from snapprune.cli import main


@pytest.fixture
def no_network(monkeypatch):
    """The process cannot open any connection (as on a machine without network)."""
    def refuse(*_args, **_kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    hub.unreachable_reason.cache_clear()
    yield
    hub.unreachable_reason.cache_clear()


@pytest.mark.parametrize("args,fragment", [
    (["prune", "--method", "thanos", "--pattern", "2:4", "--calib", "c4"],
     "calibration source 'c4'"),
    (["prune", "--method", "wanda", "--sparsity", "0.5", "--calib", "wikitext2"],
     "calibration source 'wikitext2'"),
    (["prune", "--method", "magnitude", "--sparsity", "0.5", "--eval", "wikitext2"],
     "evaluation source 'wikitext2'"),
    (["eval", "--ppl", "c4"], "evaluation source 'c4'"),
])
def test_hub_sources_are_refused_at_once_when_offline(no_network, tiny_dir, tmp_path, capsys,
                                                      args, fragment):
    out = tmp_path / "out"
    extra = ["--out", out] if args[0] == "prune" else []
    start = time.perf_counter()
    code, err = _run(capsys, args[0], "--model", tiny_dir, *args[1:], *extra, "--quiet")
    assert time.perf_counter() - start < 10  # no retry loop
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert fragment in lines[0] and "not reachable" in lines[0] and "local file" in lines[0]
    assert not out.exists()


def test_offline_mode_is_named_as_the_reason(monkeypatch, tiny_dir, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.unreachable_reason.cache_clear()
    try:
        code, err = _run(capsys, "eval", "--model", tiny_dir, "--ppl", "wikitext2", "--quiet")
    finally:
        hub.unreachable_reason.cache_clear()
    assert code == 2 and "offline mode is set (HF_HUB_OFFLINE)" in err


def test_local_sources_work_offline_and_the_run_says_its_cost(no_network, tiny_dir, tmp_path,
                                                              capsys):
    out = tmp_path / "pruned"
    code, err = _run(capsys, "prune", "--model", tiny_dir, "--method", "thanos", "--sparsity",
                     0.5, "--calib", C4_FILE, "--nsamples", 2, "--seqlen", 64, "--eval",
                     WIKI_TEST, "--eval-seqlen", 64, "--max-windows", 1, "--out", out,
                     "--quiet")
    assert code == 0, err
    cost = [line for line in err.splitlines() if line.startswith("estimate on cpu:")]
    assert cost and "calibration passes over 2 windows = 128 tokens" in cost[0]
    assert "about" in cost[0]
    report = json.loads((out / "snapprune_report.json").read_text())
    samples = report["generations"]
    assert len(samples) == 3 and all(set(s) == {"prompt", "dense", "pruned"} for s in samples)
    assert any(s["dense"] != s["pruned"] for s in samples)


def test_generate_on_a_saved_directory_beside_the_dense_model(tiny_dir, tmp_path, capsys):
    pruned = tmp_path / "pruned"
    code, err = _run(capsys, "prune", "--model", tiny_dir, "--method", "magnitude",
                     "--sparsity", 0.6, "--out", pruned, "--quiet", "--no-samples")
    assert code == 0, err
    path = tmp_path / "gen.json"
    code = main(["generate", "--model", str(pruned), "--compare", str(tiny_dir), "--prompt",
                 "Hello there", "--max-new-tokens", "5", "--json", str(path), "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0 and "> Hello there" in printed and "dense:" in printed
    rows = json.loads(path.read_text())["generations"]
    assert rows[0]["prompt"] == "Hello there" and rows[0]["model"] != rows[0]["dense"]
    assert "generations" not in json.loads((pruned / "snapprune_report.json").read_text())


def test_the_shortest_command_works_offline_and_names_its_defaults(no_network, tiny_dir,
                                                                   tmp_path, capsys):
    """No calibration source, sparsity or evaluation given, no network: the bundled samples,
    50%, and a labelled summary (dense → pruned, ratio, where the files are, what next)."""
    out = tmp_path / "pruned"
    code = main(["prune", "--model", str(tiny_dir), "--method", "thanos", "--out", str(out),
                 "--nsamples", "2", "--seqlen", "32", "--eval-seqlen", "32", "--max-windows",
                 "2", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    notes = captured.err.splitlines()
    assert any("bundled C4 sample" in n and "not reachable" in n for n in notes)
    assert any(n.startswith("sparsity: 0.5 (the field's standard setting") for n in notes)
    summary = captured.out
    assert "perplexity  wikitext2-test (2 × 32 tokens): dense " in summary
    assert "→ pruned" in summary and "×" in summary
    assert f"saved       {out}" in summary
    assert "snapprune generate --model" in summary and "snapprune shrink" in summary
    report = json.loads((out / "snapprune_report.json").read_text())
    assert report["calibration"]["source"] == "c4-sample"
    assert report["settings"]["sparsity"] == 0.5 and report["settings"]["metric"] == "wanda"
    assert set(report["perplexity"]) == set(report["dense_perplexity"]) == {"wikitext2-test"}
    assert report["notes"] and report["estimate"]["total_seconds"] > 0


def test_out_is_required_unless_no_save(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["prune", "--model", tiny_dir, "--method", "magnitude", "--no-eval", "--quiet"]
    code, err = _run(capsys, *args)
    assert code == 2 and "--out DIR" in err and "--no-save" in err
    code, err = _run(capsys, *args, "--no-save", "--json", "r.json")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # nothing else written


def test_long_options_are_never_abbreviated(tiny_dir, capsys):
    code, err = _run(capsys, "prune", "--model", tiny_dir, "--eval-seq", 64, "--no-save")
    assert code == 2 and "unrecognized arguments: --eval-seq" in err
    code, err = _run(capsys, "eval", "--model", tiny_dir, "--eval", "wikitext2-test",
                     "--seqlen", 32, "--max-windows", 1, "--quiet")
    assert code == 0, err  # prune's flag name works for eval too
