"""One run path: the command line is only a way to build a ``Job``; ``run.execute`` does the
work, recipes describe whole runs, and a run replays from its report."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import yaml
from conftest import C4_FILE
from test_cli import _run

import snapprune
from snapprune import SnapPruneError
from snapprune.jobs import (
    CalibrationSpec,
    EvaluationSpec,
    Execution,
    Job,
    OutputSpec,
)
from snapprune.models.settings import PruneSettings, ShrinkSettings
from snapprune.recipes import job_from_dict, read_recipe
from snapprune.run import execute

VOLATILE = ("timing", "created", "argv", "estimate", "versions", "peak_memory_bytes",
            "saved_to", "layers", "device_info")


def _tensors(directory: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def _timeless(value):
    if isinstance(value, dict):
        return {k: _timeless(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [_timeless(v) for v in value]
    return value


def _stable(report: dict) -> dict:
    """The report without what legitimately differs between two runs (times, argv)."""
    return _timeless({**{k: v for k, v in report.items() if k not in VOLATILE},
                      "layers": report["layers"]})


ARGS = ["--method", "thanos", "--pattern", "2:4", "--calib", str(C4_FILE), "--nsamples", "2",
        "--seqlen", "32", "--eval", "wikitext2-test", "--eval-seqlen", "32", "--max-windows",
        "2", "--deterministic", "--quiet"]


def test_the_command_line_and_execute_give_identical_outputs(tiny_dir, tmp_path, capsys):
    by_cli = tmp_path / "cli"
    code, err = _run(capsys, "prune", "--model", tiny_dir, *ARGS, "--out", by_cli)
    assert code == 0, err
    job = Job(model=str(tiny_dir), steps=(PruneSettings("thanos", "2:4"),),
              calibration=CalibrationSpec(str(C4_FILE), 2, 32),
              evaluation=EvaluationSpec(ppl=("wikitext2-test",), seqlen=32, max_windows=2),
              execution=Execution(deterministic=True))
    outcome = execute(job, tmp_path / "api", progress=False)
    assert outcome.saved == (tmp_path / "api").resolve()
    cli_tensors, api_tensors = _tensors(by_cli), _tensors(tmp_path / "api")
    assert cli_tensors.keys() == api_tensors.keys()
    assert all((cli_tensors[k] == api_tensors[k]).all() for k in cli_tensors)
    cli_report = json.loads((by_cli / "snapprune_report.json").read_text())
    api_report = json.loads((tmp_path / "api" / "snapprune_report.json").read_text())
    assert _stable(cli_report) == _stable(api_report)
    assert cli_report["argv"][:2] == ["snapprune", "prune"] and api_report["argv"] is None
    assert cli_report["generations"] == api_report["generations"]


def test_a_run_replays_bit_for_bit_from_its_report(tiny_dir, tmp_path, capsys):
    first = tmp_path / "first"
    code, err = _run(capsys, "prune", "--model", tiny_dir, *ARGS, "--out", first)
    assert code == 0, err
    for source in (first / "snapprune_report.json", first / "snapprune_recipe.yaml"):
        again = tmp_path / f"again-{source.suffix[1:]}"
        code, err = _run(capsys, "run", source, "--out", again, "--quiet")
        assert code == 0, err
        a, b = _tensors(first), _tensors(again)
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
        report_a = json.loads((first / "snapprune_report.json").read_text())
        report_b = json.loads((again / "snapprune_report.json").read_text())
        assert _timeless(report_b["perplexity"]) == _timeless(report_a["perplexity"])
        assert report_b["recipe"] == report_a["recipe"]


def test_the_report_names_everything_that_made_the_run(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = _run(capsys, "prune", "--model", tiny_dir, *ARGS, "--batch-size", 3, "--out",
                     out)
    assert code == 0, err
    report = json.loads((out / "snapprune_report.json").read_text())
    assert report["argv"][:3] == ["snapprune", "prune", "--model"]
    assert report["dtype"] == "float32" and report["batch_size"] == 3
    assert report["device_info"]["device"] == "cpu" and report["device_info"]["name"]
    versions = report["versions"]
    assert {"snapprune", "torch", "transformers", "snapprune_commit"} <= set(versions)
    assert versions["lm_eval"]  # installed with the eval extra
    assert len(report["calibration"]["ids_sha256"]) == 64
    assert report["settings"]["metric"] == "wanda" and report["settings"]["sparsity"] == 0.5
    recipe = report["recipe"]
    assert recipe["steps"] == [{"prune": {**recipe["steps"][0]["prune"], "method": "thanos",
                                          "pattern": "2:4", "metric": "wanda",
                                          "sparsity": 0.5}}]
    assert recipe["execution"]["batch_size"] == 3 and recipe["execution"]["deterministic"]
    assert yaml.safe_load((out / "snapprune_recipe.yaml").read_text()) == recipe


def test_flags_override_a_recipe_and_unknown_keys_are_refused(tiny_dir, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": str(tiny_dir), "steps": [{"prune": {"method": "wanda", "sparsity": 0.25}}],
        "calibration": {"source": str(C4_FILE), "nsamples": 1, "seqlen": 16},
        "evaluation": {"ppl": [], "dense": False}, "output": {"samples": False}}))
    out = tmp_path / "out"
    code, err = _run(capsys, "prune", "--recipe", recipe, "--sparsity", 0.5, "--out", out,
                     "--quiet")
    assert code == 0, err
    report = json.loads((out / "snapprune_report.json").read_text())
    assert report["method"] == "wanda" and report["achieved_sparsity"] == pytest.approx(0.5)
    assert report["recipe"]["calibration"]["nsamples"] == 1  # from the recipe

    recipe.write_text(yaml.safe_dump({"model": "m", "steps": [{"prune": {"sparstiy": 0.5}}]}))
    code, err = _run(capsys, "run", recipe, "--out", tmp_path / "x")
    assert code == 2 and "sparstiy" in err and len(err.strip().splitlines()) == 1
    recipe.write_text(yaml.safe_dump({"model": "m", "steps": [{"shrink": {"mlp": 0.3}}]}))
    code, err = _run(capsys, "prune", "--recipe", recipe, "--out", tmp_path / "x")
    assert code == 2 and "snapprune run takes any recipe" in err
    assert not (tmp_path / "x").exists()


def test_recipes_round_trip():
    job = Job(model="m", steps=(ShrinkSettings("wanda", mlp=0.3, heads=0.2),),
              calibration=CalibrationSpec("c4-sample", 8, 128, 3),
              evaluation=EvaluationSpec(ppl=("a.txt", "wikitext2-test"), zeroshot=("x.jsonl",),
                                        max_windows=None),
              execution=Execution(batch_size=2, deterministic=True),
              output=OutputSpec(samples=False), dtype="bfloat16", revision="main")
    text = yaml.safe_dump(job.to_dict())
    assert job_from_dict(yaml.safe_load(text)) == job
    assert job_from_dict(json.loads(json.dumps(job.to_dict()))) == job
    with pytest.raises(SnapPruneError, match="unknown step"):
        job_from_dict({"model": "m", "steps": [{"distill": {}}]})
    with pytest.raises(SnapPruneError, match="unknown key"):
        job_from_dict({"model": "m", "stpes": []})


def test_a_recipe_file_that_is_not_one_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(SnapPruneError, match="cannot read recipe"):
        read_recipe(bad)
    with pytest.raises(SnapPruneError, match="not found"):
        read_recipe(tmp_path / "missing.yaml")


def test_the_command_line_holds_no_run_sequence():
    """cli/ parses and prints: it never prunes, evaluates, reports or saves itself."""
    files = sorted((Path(snapprune.__file__).parent / "cli").glob("*.py"))
    assert len(files) >= 3
    called = {node.func.attr if isinstance(node.func, ast.Attribute) else
              getattr(node.func, "id", "")
              for path in files for node in ast.walk(ast.parse(path.read_text()))
              if isinstance(node, ast.Call)}
    forbidden = {"prune_model", "shrink_model", "stream_prune", "perplexity", "evaluate",
                 "build_report", "save_pretrained", "save_directory", "Workbench"}
    assert not called & forbidden, called & forbidden
