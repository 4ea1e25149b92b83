"""Recovery: it learns, it keeps the pruned structure exactly, it resumes to the same weights,
two processes train as one, and bad input stops it in one line."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import C4_FILE
from test_cli import _run
from tiny_models import tiny_model, token_batch
from transformers import AutoModelForCausalLM

from snapprune import SnapPruneError
from snapprune.data import calibration_windows, read_documents, sample_path, wikitext_join
from snapprune.models.prune import prune_model
from snapprune.models.settings import RecoverSettings, ShrinkSettings
from snapprune.models.shrink import shrink_model
from snapprune.overlap import shared_windows
from snapprune.recovery import CRASH_ENV, recover

SMALL = dict(seqlen=32, batch_size=4, lr=3e-3, warmup=0.1)


def _pair(pattern: str = "2:4", vocab: int = 512):
    teacher = tiny_model("llama", vocab=vocab)
    student = copy.deepcopy(teacher)
    prune_model(student, token_batch(4, 32, vocab=vocab), method="magnitude", pattern=pattern,
                sparsity=None if ":" in pattern else 0.6, progress=False)
    return student, teacher


def _data(count: int, vocab: int = 512) -> torch.Tensor:
    return token_batch(count, 32, vocab=vocab, seed=3)


def test_distillation_learns_and_keeps_every_pruned_weight_at_zero():
    student, teacher = _pair("2:4")
    zeros = {n: (p == 0).clone() for n, p in student.named_parameters() if "layers" in n}
    settings = RecoverSettings(tokens=24 * 4 * 32, **SMALL)
    data = _data(4).repeat(24, 1)  # the same four windows every step: it must fit them
    run = recover(student, teacher, data, settings, progress=False)
    losses = [p["loss"] for p in run.curve]
    assert sum(losses[-4:]) < 0.5 * sum(losses[:4])  # it learns
    changed = 0
    for name, param in student.named_parameters():
        if name in zeros:
            assert (param[zeros[name]] == 0).all(), name  # exactly, not approximately
            changed += int((param[~zeros[name]] != 0).sum())
        if name.endswith("proj.weight"):
            groups = (param == 0).reshape(param.shape[0], -1, 4).sum(2)
            assert (groups >= 2).all(), name  # 2:4 in every group
    assert changed > 0 and run.structure_kept and run.frozen_zeros > 0


def test_lm_loss_needs_no_teacher_and_shrunk_shapes_stay():
    teacher = tiny_model("llama")
    smaller, _ = shrink_model(copy.deepcopy(teacher), token_batch(4, 32),
                              ShrinkSettings(mlp=0.25), progress=False)
    shapes = {n: p.shape for n, p in smaller.named_parameters()}
    run = recover(smaller, None, _data(8 * 4), RecoverSettings(tokens=8 * 4 * 32, loss="lm",
                                                                **SMALL), progress=False)
    assert {n: p.shape for n, p in smaller.named_parameters()} == shapes
    assert smaller.config.intermediate_size == 96 and run.steps == 8
    # Distillation with SquareHead's hidden-state term works on the shrunk student too.
    run = recover(smaller, teacher, _data(4 * 4), RecoverSettings(
        tokens=4 * 4 * 32, hidden_weight=1.0, **SMALL), progress=False)
    assert all(p["loss"] > 0 for p in run.curve)


def test_embeddings_are_frozen_and_the_teacher_untouched():
    student, teacher = _pair("unstructured")
    embedding = student.model.embed_tokens.weight.clone()
    dense = {n: p.clone() for n, p in teacher.named_parameters()}
    recover(student, teacher, _data(8), RecoverSettings(tokens=2 * 4 * 32, **SMALL),
            progress=False)
    assert torch.equal(student.model.embed_tokens.weight, embedding)
    assert all(torch.equal(p, dense[n]) for n, p in teacher.named_parameters())


def test_shared_text_is_found():
    stream = token_batch(1, 400, seed=5)[0]
    train = torch.stack([token_batch(1, 64, seed=6)[0], stream[100:164]])
    assert shared_windows(train, [stream]) == 1
    assert shared_windows(train[:1], [stream]) == 0


@pytest.mark.parametrize("settings,fragment", [
    (dict(tokens=10), "less than one optimiser step"),
    (dict(loss="ce"), "unknown recovery loss"),
    (dict(loss="lm", hidden_weight=1.0), "no teacher"),
    (dict(warmup=1.5), "fraction"),
    (dict(dtype="float16"), "bfloat16"),
])
def test_settings_are_refused_in_one_line(settings, fragment):
    with pytest.raises(SnapPruneError, match=fragment):
        RecoverSettings(**{**SMALL, **settings}).check()


def test_a_teacher_of_another_architecture_is_refused():
    student, _ = _pair()
    other = tiny_model("gpt2")
    with pytest.raises(SnapPruneError, match="model_type"):
        recover(student, other, _data(8), RecoverSettings(tokens=4 * 32, **SMALL),
                progress=False)


def test_a_non_finite_loss_stops_in_one_line(tmp_path):
    student, teacher = _pair()
    with pytest.raises(SnapPruneError, match="not finite"):
        recover(student, teacher, _data(64), RecoverSettings(
            tokens=16 * 4 * 32, **{**SMALL, "lr": 1e30}), checkpoint_dir=tmp_path / "ck",
            progress=False)


# -- the command line: reports, resume, refusals, two processes ---------------------------

@pytest.fixture(scope="module")
def pruned_dir(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pruned") / "p24"
    from snapprune.cli import main

    code = main(["prune", "--model", str(tiny_dir), "--method", "magnitude", "--pattern",
                 "2:4", "--no-eval", "--no-samples", "--out", str(out), "--quiet"])
    assert code == 0
    return out


RECOVER = ["--tokens", "1024", "--seqlen", "32", "--batch-size", "4", "--lr", "1e-3",
           "--data", str(C4_FILE), "--eval-seqlen", "32", "--max-windows", "2",
           "--checkpoint-every", "2", "--deterministic", "--no-samples", "--quiet"]


def _tensors(directory):
    from safetensors.torch import load_file

    return load_file(directory / "model.safetensors")


def test_recover_command_report_and_a_killed_run_resumes_exactly(pruned_dir, tiny_dir, tmp_path,
                                                                 capsys, one_thread):
    whole = tmp_path / "whole"
    code, err = _run(capsys, "recover", "--model", pruned_dir, *RECOVER, "--out", whole)
    assert code == 0, err
    report = json.loads((whole / "snapprune_report.json").read_text())
    recovery = report["recovery"]
    assert recovery["teacher"] == str(tiny_dir)  # the dense model the student's report names
    assert recovery["structure_kept"] and recovery["steps"] == 8 and recovery["tokens"] == 1024
    assert len(recovery["loss_curve"]) == 8 and recovery["tokens_per_second"] > 0
    assert report["perplexity"] and report["dense_perplexity"]  # before and after
    assert (whole / "recovery.png").read_bytes()[:4] == b"\x89PNG"
    before = _tensors(pruned_dir)
    after = _tensors(whole)
    for name, value in after.items():
        if name.endswith("proj.weight"):
            assert torch.equal(value == 0, before[name] == 0), name  # same sparsity pattern

    out = tmp_path / "resumed"
    args = [sys.executable, "-m", "snapprune", "recover", "--model", str(pruned_dir), *RECOVER,
            "--out", str(out)]
    killed = subprocess.run(args, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", CRASH_ENV: "4"})
    assert killed.returncode == -9, killed.stderr
    code, err = _run(capsys, "recover", "--model", pruned_dir, *RECOVER, "--out", out)
    assert code == 2 and "--resume" in err and "--restart" in err  # nothing overwritten
    code, err = _run(capsys, "recover", "--model", pruned_dir, *RECOVER, "--out", out,
                     "--resume")
    assert code == 0, err
    resumed = _tensors(out)
    assert all(torch.equal(resumed[n], after[n]) for n in after)
    report = json.loads((out / "snapprune_report.json").read_text())
    assert report["recovery"]["resumed_at"] == 4
    assert [p["loss"] for p in report["recovery"]["loss_curve"]] == \
        [p["loss"] for p in recovery["loss_curve"]]
    assert not any(p.name.endswith("partial-recover") for p in tmp_path.iterdir())


def test_recover_refusals_write_nothing(pruned_dir, tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    plain = tmp_path / "plain"  # a model without a snapprune report
    AutoModelForCausalLM.from_pretrained(pruned_dir).save_pretrained(plain)
    capsys.readouterr()
    code, err = _run(capsys, "recover", "--model", plain, *RECOVER, "--out", out)
    assert code == 2 and "--teacher" in err and len(err.strip().splitlines()) == 1
    wiki = tmp_path / "wiki.txt"  # training text that is the evaluated text
    text = wikitext_join(read_documents(sample_path("wikitext-2-test.raw.gz"))[0])
    wiki.write_text(text[:3000])
    args = [a if a != str(C4_FILE) else str(wiki) for a in RECOVER]
    args[args.index("--max-windows") + 1] = "8"
    code, err = _run(capsys, "recover", "--model", pruned_dir, *args, "--out", out)
    assert code == 2 and "share text with the evaluation" in err, err
    code, err = _run(capsys, "recover", "--model", pruned_dir, *RECOVER, "--tokens", "8",
                     "--out", out)
    assert code == 2 and "less than one optimiser step" in err
    assert not out.exists()


@pytest.mark.slow
def test_two_processes_train_as_one(pruned_dir, tmp_path):
    """torchrun, gloo, 2 processes × 2 windows against 1 process × 4 windows: the same loss
    curve to float round-off (DDP averages the gradients)."""
    one, two = tmp_path / "one", tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["recover", "--model", str(pruned_dir), *RECOVER]
    first = subprocess.run([sys.executable, "-m", "snapprune", *common, "--out", str(one)],
                           capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    second = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             "--master_port=29517", "-m", "snapprune", *common, "--out",
                             str(two)], capture_output=True, text=True, env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    a = json.loads((one / "snapprune_report.json").read_text())["recovery"]["loss_curve"]
    b = json.loads((two / "snapprune_report.json").read_text())["recovery"]["loss_curve"]
    assert len(a) == len(b) == 8
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4, abs=1e-6)


def test_recover_api_on_in_memory_models_then_quantise(tokenizer):
    """prune → recover → quantise in one script, nothing on disk."""
    from snapprune.engine.quantizers import quantize_weight

    teacher = tiny_model("llama", vocab=len(tokenizer))
    student = copy.deepcopy(teacher)
    calib = calibration_windows(str(C4_FILE), tokenizer, nsamples=4, seqlen=32)
    prune_model(student, calib, method="thanos", pattern="2:4", progress=False)
    data = calibration_windows(str(C4_FILE), tokenizer, nsamples=8, seqlen=32, seed=1)
    import snapprune

    run = snapprune.recover(student, teacher, data, RecoverSettings(tokens=2 * 4 * 32, **SMALL),
                            progress=False)
    assert run.structure_kept
    weight = student.model.layers[0].mlp.down_proj.weight
    mask = weight == 0
    q = quantize_weight(weight, None, "q4_0", method="rtn", mask=mask)
    assert (q.weight[mask] == 0).all()


def test_the_summary_loss_is_the_mean_of_the_first_and_last_tenth_of_the_steps():
    from snapprune.steps.recover import loss_ends

    curve = [{"loss": float(v)} for v in (9, 1, *[5] * 16, 2, 4)]
    assert loss_ends(curve) == (5.0, 3.0, 2)  # 20 steps: the first and last two
    assert loss_ends(curve[:3]) == (9.0, 5.0, 1)
