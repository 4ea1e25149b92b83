"""The step protocol: every kind in the registry runs a tiny job through ``execute``, the
command line and a recipe with the same result, and nothing outside ``steps/`` branches on a
step's type."""

from __future__ import annotations

import ast
import json
from dataclasses import replace
from pathlib import Path
from typing import ClassVar

import pytest
import yaml
from conftest import C4_FILE, WIKI_TEST
from test_cli import _run

import snapprune
from snapprune.jobs import CalibrationSpec, EvaluationSpec, Execution, Job, OutputSpec
from snapprune.models.search_settings import SearchSettings
from snapprune.models.settings import (
    DepthSettings,
    ExpertSettings,
    PruneSettings,
    QuantizeSettings,
    RecoverSettings,
    ShrinkSettings,
)
from snapprune.run import execute
from snapprune.steps import REGISTRY, check_job, step_for

PACKAGE = Path(snapprune.__file__).parent

TINY = {
    "prune-depth": (DepthSettings(blocks=1, score="kl"), ["--blocks", "1", "--score", "kl"]),
    "prune-experts": (ExpertSettings(keep=0.5), ["--keep", "0.5"]),
    "prune": (PruneSettings("thanos", "2:4"), ["--method", "thanos", "--pattern", "2:4"]),
    "shrink": (ShrinkSettings(mlp=0.5, multiple_of=16), ["--mlp", "0.5", "--multiple-of", "16"]),
    "search": (SearchSettings(target_params=0.85, points=2, windows=1),
               ["--target-params", "0.85", "--points", "2", "--windows", "1"]),
    "quantize": (QuantizeSettings("w4g16"), ["--scheme", "w4g16"]),
    "recover": (RecoverSettings(tokens=64, seqlen=16, batch_size=2, data=str(C4_FILE),
                                loss="lm"),
                ["--tokens", "64", "--seqlen", "16", "--batch-size", "2", "--data",
                 str(C4_FILE), "--loss", "lm"]),
}
"""A tiny job of every step kind, as settings and as the flags of its command. A kind added
to the registry without an entry here fails ``test_every_kind_has_a_tiny_job``. Each runs on
the tiny LLaMA, but for kinds of mixtures of experts (``MOE_KINDS``), on the tiny Qwen2-MoE."""
MOE_KINDS = ("prune-experts",)

COMMON = ["--calib", str(C4_FILE), "--nsamples", "2", "--seqlen", "16", "--eval", WIKI_TEST,
          "--eval-seqlen", "32", "--max-windows", "1", "--deterministic", "--no-samples",
          "--quiet"]


def _tensors(directory: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def test_every_kind_has_a_tiny_job():
    assert set(TINY) == set(REGISTRY)
    for name, step in REGISTRY.items():
        assert step.name == name and step_for(step.settings_type()) is step
        assert step.command is not None and step.command.name == name


@pytest.mark.parametrize("kind", sorted(TINY))
def test_every_kind_runs_alike_through_execute_the_cli_and_a_recipe(kind, request, tmp_path,
                                                                     capsys):
    settings, flags = TINY[kind]
    tiny_dir = request.getfixturevalue("moe_dir" if kind in MOE_KINDS else "tiny_dir")
    calibrated = kind != "recover"  # recovery trains on its own text, has no calibration
    common = COMMON if calibrated else COMMON[6:]
    if kind == "recover":  # the teacher: the dense model itself (a tiny job needs no report)
        settings = replace(settings, teacher=str(tiny_dir))
        flags = [*flags, "--teacher", str(tiny_dir)]
    job = Job(model=str(tiny_dir), steps=(settings,),
              calibration=CalibrationSpec(str(C4_FILE), 2, 16) if calibrated
              else CalibrationSpec(),
              evaluation=EvaluationSpec(ppl=(WIKI_TEST,), seqlen=32, max_windows=1),
              execution=Execution(deterministic=True), output=OutputSpec(samples=False))
    api = execute(job, tmp_path / "api", progress=False)
    assert api.run_of(kind) is not None
    code, err = _run(capsys, kind, "--model", tiny_dir, *flags, *common,
                     "--out", tmp_path / "cli")
    assert code == 0, err
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(job.to_dict()))
    code, err = _run(capsys, "run", recipe, "--out", tmp_path / "recipe", "--quiet")
    assert code == 0, err
    reference = _tensors(tmp_path / "api")
    for other in ("cli", "recipe"):
        tensors = _tensors(tmp_path / other)
        assert tensors.keys() == reference.keys(), other
        assert all((tensors[k] == reference[k]).all() for k in tensors), other
        report = json.loads((tmp_path / other / "snapprune_report.json").read_text())
        assert [next(iter(s)) for s in report["recipe"]["steps"]] == [kind]
        assert report["saved_to"] == str((tmp_path / other).resolve())


def test_each_kind_declares_its_rules_once():
    """Order and exclusivity come from the kinds' facts: steps that remove weights first; each
    kind at most once, in the registry's order; kinds of one order exclude each other."""
    prune, shrink = TINY["prune"][0], TINY["shrink"][0]
    quantize, recover = TINY["quantize"][0], TINY["recover"][0]
    depth = TINY["prune-depth"][0]
    for steps, message in (((prune, shrink), "prune or shrink, not both"),
                           ((quantize, prune), "come first"),
                           ((shrink, depth), "in the order"),
                           ((quantize, recover), "in the order"),
                           ((recover, recover), "at most once")):
        with pytest.raises(snapprune.SnapPruneError, match=message):
            check_job(Job(model="m", steps=steps))
    check_job(Job(model="m", steps=(depth, shrink, recover, quantize)))  # depth, then width


SETTINGS_AND_RUNS = {"PruneSettings", "ShrinkSettings", "QuantizeSettings", "RecoverSettings",
                     "DepthSettings", "PruneRun", "ShrinkRun", "QuantizeRun", "RecoverRun",
                     "DepthRun"}


def _type_checks(tree: ast.AST) -> set[str]:
    """Names of step settings or run records a module checks a value's type against."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("isinstance",
                                                                           "issubclass"):
            target = node.args[1]
            names = target.elts if isinstance(target, ast.Tuple) else [target]
            found |= {getattr(n, "id", getattr(n, "attr", "")) for n in names}
        elif isinstance(node, ast.Compare) and any(isinstance(op, (ast.Is, ast.IsNot, ast.Eq))
                                                   for op in node.ops):
            sides = [node.left, *node.comparators]
            if any(isinstance(s, ast.Call) and getattr(s.func, "id", "") == "type"
                   for s in sides):
                found |= {getattr(s, "id", getattr(s, "attr", "")) for s in sides}
    return found & SETTINGS_AND_RUNS


def test_no_module_outside_steps_branches_on_a_steps_type():
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent.name == "steps":
            continue
        checked = _type_checks(ast.parse(path.read_text()))
        assert not checked, f"{path.relative_to(PACKAGE)} checks types {sorted(checked)}"


def test_the_type_check_finder_finds_type_checks():
    """The architecture test above can fail: it sees each form of a type check."""
    for source in ("isinstance(x, PruneSettings)", "isinstance(r, (PruneRun, ShrinkRun))",
                   "type(s) is QuantizeSettings", "type(s) == RecoverRun"):
        assert _type_checks(ast.parse(source)), source
    assert not _type_checks(ast.parse("isinstance(x, dict)"))


def test_no_module_is_over_500_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long


def test_a_new_step_kind_plugs_in_at_one_place(tiny_dir, tmp_path, capsys):
    """The worked example of docs/architecture.md: a kind defined in one module (here, in
    the test) is a command, a recipe step and a report section, with no other change."""
    from dataclasses import dataclass

    import torch

    from snapprune.flags import Command, Flag
    from snapprune.models.records import RunRecord
    from snapprune.models.targets import target_layers
    from snapprune.steps.base import Step

    @dataclass(frozen=True)
    class HalfSettings:
        """Round every decoder-block weight to float16 and back (a toy quantiser)."""

        include: tuple[str, ...] = ()
        kind: ClassVar[str] = "half"
        needs_calibration: ClassVar[bool] = False

        def check(self) -> None:
            if not isinstance(self.include, tuple):
                raise snapprune.SnapPruneError("include must be a list of patterns")

        def resolved(self):
            return self

    @dataclass(kw_only=True)
    class HalfRun(RunRecord):
        rounded: int = 0

    class HalfStep(Step):
        name = "half"
        settings_type = HalfSettings
        order = 25
        label = "rounded"
        verb = "round"
        changes = frozenset({"grid"})
        command = Command("half", help="round weights to float16", description="Round.",
                          epilog="", groups=("evaluation", "output"), what="rounding")
        flags = (Flag("include", ("--include",), "only these layers", action="append",
                      show_default=False),)

        def apply(self, settings, context, fused=None):
            run = HalfRun()
            for named in target_layers(context.bench.model, settings.include).values():
                for module in named.values():
                    module.weight.data = module.weight.data.half().float()
                    run.rounded += 1
            return run

        def summary(self, run) -> str:
            return f"rounded {run.rounded} layers to float16"

        def report(self, run) -> dict:
            return {"half": {"layers": run.rounded}}

    try:
        assert "half" in REGISTRY
        code, err = _run(capsys, "half", "--model", tiny_dir, "--include", "mlp", "--max-windows",
                         "1", "--eval-seqlen", "32", "--no-samples", "--quiet", "--out",
                         tmp_path / "cli")
        assert code == 0, err
        report = json.loads((tmp_path / "cli" / "snapprune_report.json").read_text())
        assert report["half"] == {"layers": 9} and report["recipe"]["steps"] == [
            {"half": {"include": ["mlp"]}}]
        code, err = _run(capsys, "run", tmp_path / "cli" / "snapprune_recipe.yaml", "--out",
                         tmp_path / "again", "--quiet")
        assert code == 0, err
        a, b = _tensors(tmp_path / "cli"), _tensors(tmp_path / "again")
        assert all(torch.equal(a[k], b[k]) for k in a)
        down = a["model.layers.0.mlp.down_proj.weight"]
        assert torch.equal(down, down.half().float())
    finally:
        REGISTRY.pop("half", None)
