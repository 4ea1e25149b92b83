"""Nothing lost, nothing wrong: every data-safety and wrong-result defect found on the way
pinned by a test (each failed before its fix)."""

from __future__ import annotations

import builtins
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import C4_FILE
from test_cli import _run
from tiny_models import tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from snapprune import SnapPruneError
from snapprune.data import read_documents
from snapprune.models import streaming
from snapprune.models.streaming import CRASH_ENV, partial_dir

QUIET = ("--quiet", "--no-eval", "--no-samples")


# -- 1. --overwrite replaces only what snapprune wrote ------------------------------------

def test_overwrite_never_removes_a_directory_snapprune_did_not_write(tiny_dir, tmp_path,
                                                                     capsys):
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("years of work")
    code, err = _run(capsys, "prune", "--model", tiny_dir, "--method", "magnitude",
                     "--sparsity", 0.5, "--out", mine, "--overwrite", *QUIET)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "not written by snapprune" in lines[0]
    assert (mine / "chapter1.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis"]

    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = _run(capsys, "prune", "--model", tiny_dir, "--method", "magnitude",
                     "--sparsity", 0.5, "--out", empty, "--overwrite", *QUIET)
    assert code == 0, err
    code, err = _run(capsys, "prune", "--model", tiny_dir, "--method", "wanda", "--sparsity",
                     0.5, "--calib", C4_FILE, "--nsamples", 1, "--seqlen", 16, "--out", empty,
                     "--overwrite", *QUIET)
    assert code == 0, err  # its own output: replaced
    assert json.loads((empty / "snapprune_report.json").read_text())["method"] == "wanda"


# -- 2, 3, 6. streamed runs: progress kept, fingerprint whole, state inert, allow-list -----

def _args(model: Path, out: Path, *extra: str, calib: Path = C4_FILE) -> list[str]:
    return ["prune", "--model", str(model), "--method", "wanda", "--sparsity", "0.5",
            "--calib", str(calib), "--nsamples", "2", "--seqlen", "32", "--out", str(out),
            "--stream", *QUIET, *extra]


def _killed_after(block: int, model: Path, out: Path, *extra: str, calib: Path = C4_FILE):
    """A streamed run killed (SIGKILL, as kill -9) right after ``block``'s checkpoint: a
    process of its own, as a real crash is."""
    args = [sys.executable, "-m", "snapprune", *_args(model, out, *extra, calib=calib)]
    result = subprocess.run(args, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", CRASH_ENV: str(block)})
    assert result.returncode == -9, result.stderr


def _saved_block(out: Path) -> int:
    state = json.loads((partial_dir(out.resolve()) / streaming.STATE_NAME).read_text())
    return state["next_block"]


def test_streamed_overwrite_keeps_the_guard(tmp_path, sharded_dir, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    code, err = _run(capsys, *_args(sharded_dir, mine, "--overwrite"))
    assert code == 2 and "not written by snapprune" in err
    assert (mine / "notes.txt").read_text() == "keep"


def test_a_new_run_never_discards_saved_progress(sharded_dir, tmp_path, capsys):
    out = tmp_path / "out"
    _killed_after(1, sharded_dir, out)
    assert _saved_block(out) == 2
    code, err = _run(capsys, *_args(sharded_dir, out))
    assert code == 2 and "resume to continue" in err and "restart to discard" in err
    assert _saved_block(out) == 2  # untouched
    code, err = _run(capsys, *_args(sharded_dir, out, "--restart"))
    assert code == 0, err
    assert not partial_dir(out.resolve()).exists() and (out / "snapprune_report.json").exists()


@pytest.fixture(scope="module")
def stopped(sharded_dir, tmp_path_factory):
    """A streamed run killed after its first block (left as it is by every test using it)."""
    out = tmp_path_factory.mktemp("stopped") / "out"
    _killed_after(0, sharded_dir, out)
    return out


@pytest.mark.parametrize("change", [("--seed", "1"), ("--batch-size", "1"),
                                    ("--nsamples", "3"), ("--no-layer-errors",),
                                    ("--calib", "c4-sample")])
def test_resume_refuses_any_other_job(sharded_dir, stopped, capsys, change):
    args = _args(sharded_dir, stopped, "--resume")
    if change[0] in args:  # replace the value _args passes
        args[args.index(change[0]) + 1] = change[1]
    else:
        args += list(change)
    code, err = _run(capsys, *args)
    assert code == 2 and "differ" in err, err
    assert _saved_block(stopped) == 1  # nothing was continued or lost


def test_resume_refuses_calibration_text_that_changed(sharded_dir, tmp_path, capsys):
    """Same command, same path, other text: only the calibration ids' hash can tell."""
    text = tmp_path / "calib.jsonl"
    docs = read_documents(C4_FILE)
    text.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:40]))
    out = tmp_path / "out"
    _killed_after(0, sharded_dir, out, calib=text)
    text.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[40:80]))
    code, err = _run(capsys, *_args(sharded_dir, out, "--resume", calib=text))
    assert code == 2 and "calibration_ids" in err, err


def test_resume_state_is_inert_and_outputs_copy_only_what_belongs(tmp_path, tiny_dir, capsys):
    source = tmp_path / "source"
    AutoModelForCausalLM.from_pretrained(tiny_dir).save_pretrained(source,
                                                                   max_shard_size="200KB")
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(source)
    torch.save({"not": "a model of ours"}, source / "pytorch_model.bin")
    (source / "notes.txt").write_text("private")
    out = tmp_path / "out"
    _killed_after(1, source, out)
    state = partial_dir(out.resolve())
    suffixes = {p.suffix for p in state.iterdir() if p.name.startswith("snapprune_resume")}
    assert suffixes == {".json", ".safetensors"}  # nothing torch.load or pickle would read
    code, err = _run(capsys, *_args(source, out, "--resume"))
    assert code == 0, err
    names = {p.name for p in out.iterdir()}
    assert "pytorch_model.bin" not in names and "notes.txt" not in names
    assert {"config.json", "tokenizer.json", "snapprune_report.json"} <= names


# -- 4, 5. sweeps: the key names the model; percdamp 0 is 0 -------------------------------

def test_a_sweep_of_another_model_never_reads_this_models_cells(tiny_dir, tmp_path, capsys):
    other = tmp_path / "other"
    tiny_model("llama", seed=7, vocab=len(AutoTokenizer.from_pretrained(tiny_dir))) \
        .save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(other)
    out = tmp_path / "sweep"
    common = ["sweep", "--method", "wanda", "--calib", C4_FILE, "--nsamples", 1, "--seqlen", 32,
              "--ppl", C4_FILE, "--eval-seqlen", 32, "--max-windows", 2, "--out", out,
              "--quiet"]
    code, err = _run(capsys, *common, "--model", tiny_dir)
    assert code == 0, err
    code, err = _run(capsys, *common, "--model", other)
    assert code == 0 and "0 already finished" in err and "1 to run" in err, err
    records = [json.loads(line) for line in (out / "cells.jsonl").read_text().splitlines()]
    assert [r["model"] for r in records] == [str(tiny_dir), str(other)]
    assert records[0]["perplexity"] != records[1]["perplexity"]
    assert {"device", "dtype", "deterministic"} <= set(records[1])


def test_a_grid_percdamp_of_zero_runs_at_zero():
    from snapprune.sweep import canonical_cell

    cell = canonical_cell("sparsegpt", percdamp=0.0, calib="c4-sample")
    assert cell.percdamp == 0.0 and cell.settings().percdamp == 0.0
    with pytest.raises(SnapPruneError, match="percdamp"):
        canonical_cell("sparsegpt", percdamp=-1.0, calib="c4-sample")


# -- 7. strict JSON, checks before loading, one-line refusals, no /proc --------------------

def _strict(text: str):
    def refuse(name):
        raise AssertionError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_reports_are_strict_json(tiny_dir, tmp_path, capsys):
    out = tmp_path / "magnitude"
    code, err = _run(capsys, "prune", "--model", tiny_dir, "--method", "magnitude",
                     "--sparsity", 0.5, "--out", out, "--json", tmp_path / "copy.json", *QUIET)
    assert code == 0, err
    report = _strict((out / "snapprune_report.json").read_text())
    _strict((tmp_path / "copy.json").read_text())
    assert all(layer["error"] is None for layer in report["layers"])  # unknown: null


@pytest.mark.parametrize("method", ["magnitude", "wanda", "thanos"])
def test_settings_are_checked_before_the_model_is_loaded(method, tmp_path, capsys,
                                                         monkeypatch):
    import snapprune.models.loading as loading

    def never(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(loading, "load_model", never)
    code, err = _run(capsys, "prune", "--model", "smollm2-135m", "--method", method,
                     "--sparsity", 0.5, "--percdamp", -5, "--out", tmp_path / "o", *QUIET)
    assert code == 2 and "percdamp" in err and len(err.strip().splitlines()) == 1


def test_unknown_keys_in_a_sweep_file_are_one_line(tmp_path, capsys):
    path = tmp_path / "grid.json"
    path.write_text(json.dumps({"model": "m", "grids": [{"method": ["wanda"]}],
                                "evaluation": {"ppl": ["wikitext2-test"], "windows": 3}}))
    code, err = _run(capsys, "sweep", "--grid", path, "--out", tmp_path / "out")
    assert code == 2 and "windows" in err and len(err.strip().splitlines()) == 1
    path.write_text(json.dumps({"model": "m", "grid": [{"method": ["wanda"]}]}))
    code, err = _run(capsys, "sweep", "--grid", path, "--out", tmp_path / "out")
    assert code == 2 and "unknown key" in err and len(err.strip().splitlines()) == 1


def test_nothing_reads_proc_itself(tiny_dir, tmp_path, capsys, monkeypatch):
    """macOS has no /proc: snapprune's own code never opens it (psutil does, portably)."""
    real_open = builtins.open

    def no_proc(file, *args, **kwargs):
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if str(file).startswith("/proc") and caller.startswith("snapprune"):
            raise FileNotFoundError(f"no such file: {file}")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_proc)
    out = tmp_path / "out"
    code, err = _run(capsys, "prune", "--model", tiny_dir, "--method", "wanda", "--sparsity",
                     0.5, "--calib", C4_FILE, "--nsamples", 1, "--seqlen", 16, "--out", out,
                     *QUIET)
    assert code == 0, err


# -- 8. devices: one block for the estimate, dispatch when the model does not fit ---------

def test_the_estimate_never_moves_the_whole_model(tiny_dir, monkeypatch):
    from snapprune.estimate import estimate_job
    from snapprune.jobs import CalibrationSpec, EvaluationSpec, Job
    from snapprune.models.settings import PruneSettings
    from snapprune.workbench import Workbench

    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    moved = []
    original = torch.nn.Module.to

    def spy(self, *args, **kwargs):
        moved.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", spy)
    job = Job(model=str(tiny_dir), steps=(PruneSettings("thanos", sparsity=0.5),),
              calibration=CalibrationSpec(str(C4_FILE), 2, 32),
              evaluation=EvaluationSpec(ppl=("wikitext2-test",), seqlen=32, max_windows=2))
    estimate = estimate_job(Workbench(model, tokenizer), job)
    assert estimate.calibration_seconds > 0 and estimate.solver_seconds > 0
    assert estimate.evaluation_seconds > 0
    assert model not in moved and model.model not in moved
    assert not any(b in moved for b in model.model.layers)  # copies only


def test_a_model_too_large_for_the_device_is_dispatched(monkeypatch):
    from snapprune import placement

    model = tiny_model("llama")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000, 10**9))
    used = []

    class Fake:
        def __init__(self, *args):
            used.append(args)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(placement, "_dispatched", Fake)
    with placement.placed(model, "cuda"):
        pass
    assert used and used[0][0] is model  # dispatched, never moved whole
    assert placement.fits_whole(900, 1000) and not placement.fits_whole(950, 1000)


def test_a_failed_move_puts_the_model_back(monkeypatch):
    from snapprune import placement

    model = tiny_model("llama")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10**12, 10**12))
    calls = []
    original = type(model).to

    def to(self, device, *args, **kwargs):
        calls.append(torch.device(device))
        if torch.device(device).type == "cuda":
            raise torch.OutOfMemoryError("CUDA out of memory")
        return original(self, device, *args, **kwargs)

    monkeypatch.setattr(type(model), "to", to)
    with pytest.raises(SnapPruneError, match="does not fit"), placement.placed(model, "cuda"):
        pass
    assert calls == [torch.device("cuda"), torch.device("cpu")]


def test_the_ranks_leave_before_the_main_rank_evaluates(tiny_dir, tmp_path, monkeypatch):
    """Under torchrun the main rank evaluates, samples and saves alone: every collective is
    behind it (the group is left first), so no rank waits on it until a timeout."""
    from snapprune.jobs import CalibrationSpec, EvaluationSpec, Job, OutputSpec
    from snapprune.models import collectives
    from snapprune.models.settings import PruneSettings
    from snapprune.run import execute
    from snapprune.workbench import Workbench

    events = []

    class Recording(collectives.Collectives):
        rank, world = 0, 2

        def gather(self, value):
            events.append("gather")
            return [value, value]

        def leave(self):
            events.append("leave")
            collectives.install(collectives.Local())

    original = Workbench.evaluate

    def evaluate(self, *args, **kwargs):
        events.append("evaluate")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Workbench, "evaluate", evaluate)
    collectives.install(Recording())
    try:
        job = Job(model=str(tiny_dir), steps=(PruneSettings("wanda", sparsity=0.5),),
                  calibration=CalibrationSpec(str(C4_FILE), 2, 32),
                  evaluation=EvaluationSpec(ppl=("wikitext2-test",), seqlen=32, max_windows=1,
                                            dense=False),
                  output=OutputSpec(samples=False))
        execute(job, tmp_path / "out", progress=False, announce=False)
    finally:
        collectives.install(collectives.Local())
    assert events.index("leave") < events.index("evaluate")
    assert "gather" not in events[events.index("leave"):]


def test_missing_parents_of_out_are_made_and_a_file_in_the_way_is_refused(tmp_path) -> None:
    from snapprune.outputs import check_output_dir, make_parents

    out = check_output_dir(tmp_path / "runs" / "deep" / "pruned", overwrite=False)
    assert not out.parent.exists()  # a check creates nothing: a refused run leaves no parents
    assert make_parents(out) == [out.parent, out.parent.parent]
    assert out.parent.is_dir() and not out.exists()
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(SnapPruneError, match="is a file"):
        check_output_dir(tmp_path / "afile" / "x" / "pruned", overwrite=False)
    assert (tmp_path / "afile").read_text() == "mine"
