"""Nothing lost, round two: the ways a run could still corrupt, delete, hang or answer with a
traceback, each pinned by a test that failed before its fix (outputs, locks, checkpoints,
recipes, paths; bad input models and data are in ``test_bad_inputs.py``)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import C4_FILE
from test_cli import _run
from test_nothing_lost import _args, _killed_after

from snapprune.checkpoints import latest_checkpoint, save_checkpoint
from snapprune.data import read_documents
from snapprune.models.streaming import partial_dir
from snapprune.outputs import MARKER, output_lock
from snapprune.recovery import CRASH_ENV, checkpoint_dir_for

QUIET = ("--quiet", "--no-eval", "--no-samples")
MAGNITUDE = ("--method", "magnitude", "--sparsity", "0.5", *QUIET)


def _one_line(code: int, err: str, fragment: str, *, alone: bool = True) -> None:
    """Exit 2 and one error line naming the problem (``alone``: nothing else printed; else
    the run's progress lines before it)."""
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("snapprune: error:")]
    assert code == 2 and len(errors) == 1 and lines[-1] == errors[0], err
    assert len(lines) == 1 or not alone, err
    assert fragment in errors[0], err
    assert "Traceback" not in err


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


# -- 1. one lock per output -----------------------------------------------------------------

def test_a_second_run_into_the_same_output_is_refused_naming_the_holder(sharded_dir, tmp_path,
                                                                        capsys):
    out = tmp_path / "out"
    with output_lock(out.resolve()):
        code, err = _run(capsys, *_args(sharded_dir, out))
        _one_line(code, err, "another snapprune run (pid")
        assert f"pid {os.getpid()}" in err
        assert not out.exists() and not partial_dir(out.resolve()).exists()
    code, err = _run(capsys, *_args(sharded_dir, out))  # the lock went with its run
    assert code == 0, err
    assert not (tmp_path / ".out.lock").exists()


# -- 2. ownership that cannot be forged -------------------------------------------------------

def test_a_report_written_by_json_does_not_make_a_directory_snapprunes(tiny_dir, tmp_path,
                                                                       capsys):
    project = tmp_path / "proj"
    (project / "src").mkdir(parents=True)
    (project / "README.md").write_text("my project")
    (project / "src" / "main.py").write_text("print('hi')")
    before = _tree(project)
    code, err = _run(capsys, "prune", "--model", tiny_dir, *MAGNITUDE, "--no-save", "--json",
                     project / "snapprune_report.json")
    assert code == 0, err
    code, err = _run(capsys, "prune", "--model", tiny_dir, *MAGNITUDE, "--out", project,
                     "--overwrite")
    _one_line(code, err, "not written by snapprune")
    after = _tree(project)
    del after["snapprune_report.json"]
    assert after == before


def test_every_output_carries_the_marker_and_overwrite_replaces_only_those(tiny_dir, tmp_path,
                                                                           capsys):
    out = tmp_path / "out"
    code, err = _run(capsys, "prune", "--model", tiny_dir, *MAGNITUDE, "--out", out)
    assert code == 0, err
    assert json.loads((out / MARKER).read_text())["run"]
    code, err = _run(capsys, "prune", "--model", tiny_dir, *MAGNITUDE, "--out", out,
                     "--overwrite")
    assert code == 0, err


# -- 3. --resume never replaces a complete output ---------------------------------------------

def test_resume_never_replaces_an_output_written_after_the_stop(sharded_dir, tiny_dir, tmp_path,
                                                                capsys):
    out = tmp_path / "out"
    _killed_after(0, sharded_dir, out)
    code, err = _run(capsys, "prune", "--model", tiny_dir, *MAGNITUDE, "--out", out)
    assert code == 0, err  # a later run wrote a complete output there
    later = _tree(out)
    code, err = _run(capsys, *_args(sharded_dir, out, "--resume"))
    _one_line(code, err, "already exists")
    assert _tree(out) == later


# -- 4, 5. recovery checkpoints: whole or absent, and of the same training text -----------------

def test_a_checkpoint_is_whole_or_the_previous_one_stays(tmp_path):
    root = tmp_path / "ckpt"
    save_checkpoint(root, "step-1", lambda d: (d / "weights.bin").write_bytes(b"one"),
                    {"step": 1})

    def torn(directory: Path) -> None:
        (directory / "weights.bin").write_bytes(b"two")
        raise KeyboardInterrupt  # killed half-way through writing step 2

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(root, "step-2", torn, {"step": 2})
    directory, state = latest_checkpoint(root)
    assert state == {"step": 1} and (directory / "weights.bin").read_bytes() == b"one"
    assert sorted(p.name for p in root.iterdir()) == ["snapprune_latest.json", "step-1"]
    (directory / "weights.bin").write_bytes(b"changed")  # damaged since
    with pytest.raises(Exception, match="damaged"):
        latest_checkpoint(root)


RECOVER = ["--tokens", "1024", "--seqlen", "32", "--batch-size", "4", "--lr", "1e-3",
           "--eval-seqlen", "32", "--max-windows", "2", "--checkpoint-every", "2",
           "--deterministic", "--no-samples", "--quiet", "--teacher"]


def _killed_recovery(model: Path, out: Path, data: Path, teacher: Path) -> None:
    args = [sys.executable, "-m", "snapprune", "recover", "--model", str(model), *RECOVER,
            str(teacher), "--data", str(data), "--out", str(out)]
    killed = subprocess.run(args, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", CRASH_ENV: "2"})
    assert killed.returncode == -9, killed.stderr


def test_recovery_resumes_only_on_the_same_training_text_and_whole_checkpoints(
        tiny_dir, tmp_path, capsys):
    text = tmp_path / "train.jsonl"
    docs = read_documents(C4_FILE)
    text.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:150]))
    out = tmp_path / "out"
    _killed_recovery(tiny_dir, out, text, tiny_dir)
    directory = checkpoint_dir_for(out.resolve())
    saved = _tree(directory)
    text.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[150:300]))
    code, err = _run(capsys, "recover", "--model", tiny_dir, *RECOVER, tiny_dir, "--data",
                     text, "--out", out, "--resume")
    _one_line(code, err, "other training text")
    assert _tree(directory) == saved and not out.exists()
    text.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:150]))
    found, _ = latest_checkpoint(directory)
    optimiser = found / "recover_optimizer.pt"
    optimiser.write_bytes(optimiser.read_bytes()[:100])  # torn since it was written
    code, err = _run(capsys, "recover", "--model", tiny_dir, *RECOVER, tiny_dir, "--data",
                     text, "--out", out, "--resume")
    _one_line(code, err, "damaged")
    assert not out.exists()


# -- 7. --out never overlaps --model ----------------------------------------------------------

def test_out_equal_to_inside_or_holding_the_model_is_refused(tiny_dir, tmp_path, capsys):
    model = tmp_path / "model"
    code, err = _run(capsys, "prune", "--model", tiny_dir, *MAGNITUDE, "--out", model)
    assert code == 0, err
    before = _tree(model)
    for out in (model, model / "inside", tmp_path):
        code, err = _run(capsys, "prune", "--model", model, *MAGNITUDE, "--out", out,
                         "--overwrite")
        _one_line(code, err, "overlap")
        assert _tree(model) == before


# -- 8, 9. recipes: values type-checked, aliases refused ----------------------------------------

@pytest.mark.parametrize("section, values, fragment", [
    ("evaluation", {"dense": "false"}, "dense must be bool"),
    ("steps", [{"prune": {"alpha": "0.1"}}], "alpha must be float"),
    ("calibration", {"source": 3}, "source must be str"),
    ("output", {"format": {"gguf": 1}}, "format must be str"),
    ("steps", {"prune": {}}, "steps must be a list"),
    ("execution", {"batch_size": True}, "batch_size must be int"),
])
def test_recipe_values_of_the_wrong_type_are_one_line(tiny_dir, tmp_path, capsys, section,
                                                      values, fragment):
    import yaml

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": str(tiny_dir), section: values}))
    code, err = _run(capsys, "run", recipe, "--out", tmp_path / "out", "--quiet")
    _one_line(code, err, fragment)
    assert not (tmp_path / "out").exists()


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path, capsys):
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)},"
              f" *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]"
              for i in range(8)]
    lines.append("model: *i")
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text("\n".join(lines) + "\n")
    assert recipe.stat().st_size < 600
    start = time.perf_counter()
    code, err = _run(capsys, "run", recipe, "--out", tmp_path / "out", "--quiet")
    assert time.perf_counter() - start < 5
    _one_line(code, err, "aliases are not allowed")
    assert len(err) < 400


# -- 12. paths in recipes are absolute ---------------------------------------------------------

def test_a_recipe_replays_from_another_directory(tiny_dir, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(tiny_dir, work / "tiny")
    shutil.copy(C4_FILE, work / "calib.jsonl.gz")
    monkeypatch.chdir(work)
    code, err = _run(capsys, "prune", "--model", "tiny", "--method", "wanda", "--calib",
                     "calib.jsonl.gz", "--nsamples", "2", "--seqlen", "16", *QUIET, "--out",
                     "pruned")
    assert code == 0, err
    recipe = json.loads((work / "pruned" / "snapprune_report.json").read_text())["recipe"]
    assert recipe["model"] == str(work / "tiny")
    assert recipe["calibration"]["source"] == str(work / "calib.jsonl.gz")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, err = _run(capsys, "run", work / "pruned" / "snapprune_recipe.yaml", "--out", "again",
                     "--quiet")
    assert code == 0, err


# -- 13. --json checked before any work -------------------------------------------------------

def test_json_naming_a_directory_is_refused_before_any_work(tiny_dir, tmp_path, capsys,
                                                            monkeypatch):
    import snapprune.models.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("loaded"))
    code, err = _run(capsys, "prune", "--model", tiny_dir, *MAGNITUDE, "--json", tmp_path,
                     "--out", tmp_path / "out")
    _one_line(code, err, "is a directory")
    assert not (tmp_path / "out").exists()


# -- minor: stale partials, contradictions, parents, disk full, a damaged resume state --------

def test_a_save_killed_half_way_is_cleaned_by_the_next_run_with_a_note(tiny_dir, tmp_path,
                                                                       capsys):
    stale = tmp_path / ".out.partial-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    code, err = _run(capsys, "prune", "--model", tiny_dir, *MAGNITUDE, "--out", tmp_path / "out")
    assert code == 0, err
    assert "removing .out.partial-abc123" in err and not stale.exists()


def test_resume_with_restart_is_refused(tiny_dir, tmp_path, capsys):
    code, err = _run(capsys, "prune", "--model", tiny_dir, *MAGNITUDE, "--out", tmp_path / "o",
                     "--resume", "--restart")
    _one_line(code, err, "choose one")


def test_a_refused_run_leaves_no_parents(tmp_path, capsys):
    out = tmp_path / "a" / "b" / "out"
    code, err = _run(capsys, "prune", "--model", tmp_path / "nothing", *MAGNITUDE, "--out", out)
    assert code == 2, err
    assert not (tmp_path / "a").exists()


def test_a_full_disk_is_one_line_with_what_to_do(tiny_dir, tmp_path, capsys, monkeypatch):
    from dataclasses import replace

    from snapprune.export import FORMATS

    def full(outcome, directory):
        (directory / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", str(directory / "model.bin"))

    monkeypatch.setitem(FORMATS, "hf", replace(FORMATS["hf"], write=full))
    code, err = _run(capsys, "prune", "--model", tiny_dir, *MAGNITUDE, "--out", tmp_path / "out")
    _one_line(code, err, "No space left on device", alone=False)
    assert "free some space" in err and not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_a_damaged_stream_state_with_resume_is_one_line(sharded_dir, tmp_path, capsys):
    out = tmp_path / "out"
    _killed_after(0, sharded_dir, out)
    state = partial_dir(out.resolve()) / "snapprune_resume.json"
    state.write_text(state.read_text()[:20])
    code, err = _run(capsys, *_args(sharded_dir, out, "--resume"))
    _one_line(code, err, "damaged")
    assert state.read_text()  # kept for --restart to discard
