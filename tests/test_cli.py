"""The command line: a full tiny run with save and reload, and every refusal."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from conftest import C4_FILE, WIKI_TEST
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from snapprune.cli import main
from snapprune.data import calibration_windows
from snapprune.models.prune import prune_model


def _run(capsys, *argv) -> tuple[int, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    return code, capsys.readouterr().err


def test_prune_eval_save_and_reload(tiny_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    code, err = _run(capsys, "prune", "--model", tiny_dir, "--method", "thanos", "--pattern",
                     "2:4", "--calib", C4_FILE, "--nsamples", 2, "--seqlen", 64, "--eval",
                     WIKI_TEST, "--eval-seqlen", 64, "--max-windows", 2, "--compare-dense",
                     "--out", out, "--quiet", "--verbose")
    assert code == 0, err
    assert "mlp.down_proj" in err  # --verbose: one line per layer
    report = json.loads((out / "snapprune_report.json").read_text())
    assert report["method"] == "thanos" and report["pattern"] == "2:4"
    assert report["achieved_sparsity"] == pytest.approx(0.5)
    assert len(report["layers"]) == 3 * 7
    assert set(report["timing"]) >= {"calibration_forward_seconds", "solver_seconds",
                                     "pruning_seconds"}
    calibration = dict(report["calibration"])
    digest = calibration.pop("ids_sha256")
    assert calibration == {"source": str(C4_FILE), "nsamples": 2, "seqlen": 64, "seed": 0}
    pruned_ppl = report["perplexity"][str(WIKI_TEST)]["perplexity"]
    dense_ppl = report["dense_perplexity"][str(WIKI_TEST)]["perplexity"]
    assert pruned_ppl > 0 and dense_ppl > 0 and pruned_ppl != dense_ppl
    assert report["versions"]["torch"] == torch.__version__

    weights = load_file(out / "model.safetensors")
    for name, w in weights.items():
        if "layers" in name and name.endswith("proj.weight"):
            assert ((w.reshape(w.shape[0], -1, 4) == 0).sum(2) == 2).all(), name

    # Plain transformers reloads it and gives the logits of the same pruning done in memory.
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    expected = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    calib = calibration_windows(str(C4_FILE), tokenizer, nsamples=2, seqlen=64, seed=0)
    assert digest == hashlib.sha256(calib.numpy().tobytes()).hexdigest()
    prune_model(expected, calib, method="thanos", pattern="2:4", progress=False)
    ids = calib[:1]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected(ids).logits)

    # An existing output directory is refused without --overwrite, kept intact.
    code, err = _run(capsys, "prune", "--model", tiny_dir, "--method", "wanda", "--sparsity",
                     0.5, "--calib", C4_FILE, "--nsamples", 1, "--seqlen", 16, "--out", out)
    assert code == 2 and "--overwrite" in err
    assert json.loads((out / "snapprune_report.json").read_text())["method"] == "thanos"
    code, err = _run(capsys, "prune", "--model", tiny_dir, "--method", "wanda", "--sparsity",
                     0.5, "--calib", C4_FILE, "--nsamples", 1, "--seqlen", 16, "--out", out,
                     "--overwrite", "--quiet")
    assert code == 0, err
    assert json.loads((out / "snapprune_report.json").read_text())["method"] == "wanda"
    assert [p.name for p in tmp_path.iterdir()] == ["pruned"]  # no temporary leftovers


def test_eval_command(tiny_dir, tmp_path, capsys):
    path = tmp_path / "ppl.json"
    code, err = _run(capsys, "eval", "--model", tiny_dir, "--ppl", WIKI_TEST, "--seqlen", 64,
                     "--max-windows", 3, "--json", path, "--quiet")
    assert code == 0, err
    result = json.loads(path.read_text())["perplexity"][str(WIKI_TEST)]
    assert result["windows"] == 3 and result["perplexity"] > 1


@pytest.fixture(scope="module")
def nan_dir(tmp_path_factory, tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    model.model.layers[1].mlp.up_proj.weight.data[3, 3] = float("nan")
    out = tmp_path_factory.mktemp("nan_model")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(out)
    return out


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--method", "thanos", "--sparsity", "1.0"], "[0, 1)"),
        (["--method", "thanos", "--sparsity", "-0.2"], "[0, 1)"),
        (["--method", "thanos", "--sparsity", "half"], "expected a number"),
        (["--method", "thanos", "--pattern", "2:5"], "divisible by 5"),
        (["--method", "obc", "--sparsity", "0.5"], "unknown method"),
        (["--method", "thanos", "--pattern", "checkerboard", "--sparsity", "0.5"],
         "unknown pattern"),
        (["--method", "thanos", "--sparsity", "0.5", "--calib", "/no/such/file.jsonl"],
         "not found"),
        (["--method", "thanos", "--sparsity", "0.5", "--nsamples", "4", "--calib", "SMALL"],
         "too little text"),
        (["--method", "thanos", "--sparsity", "0.5", "--metric", "snip"],
         "unknown mask metric"),
        (["--method", "thanos", "--sparsity", "0.5", "--eval", "/no/such.txt"], "not found"),
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(tiny_dir, tmp_path, capsys, args,
                                                       fragment):
    out = tmp_path / "out"
    small = tmp_path.parent / f"{tmp_path.name}-small.txt"
    small.write_text("Too little text for four windows of sixteen tokens.")
    args = [str(small) if a == "SMALL" else a for a in args]
    base = ["prune", "--model", tiny_dir, "--calib", C4_FILE, "--nsamples", 1, "--seqlen", 16,
            "--out", out, "--quiet"]
    code, err = _run(capsys, *base, *args)  # a repeated --calib: the later one wins
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_missing_model_and_non_finite_weights(nan_dir, tmp_path, capsys):
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    for model, fragment in [(tmp_path / "no_model", "no such directory"), (nan_dir, "NaN or Inf"),
                            (tmp_path / "empty", "config.json")]:
        code, err = _run(capsys, "prune", "--model", model, "--method", "thanos", "--sparsity",
                         0.5, "--calib", C4_FILE, "--nsamples", 1, "--seqlen", 16, "--out",
                         out, "--quiet")
        assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()


def test_saved_output_has_ordinary_permissions(tiny_dir, tmp_path, capsys):
    """Temporary files are private while written; the renamed output follows the umask."""
    out = tmp_path / "pruned"
    code, err = _run(capsys, "prune", "--model", tiny_dir, "--method", "magnitude",
                     "--sparsity", 0.5, "--out", out, "--quiet", "--no-samples")
    assert code == 0, err
    mask = os.umask(0)
    os.umask(mask)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~mask
    for item in out.iterdir():
        assert (item.stat().st_mode & 0o777) == 0o666 & ~mask, item.name


def test_the_summary_reads_a_perplexity_ratio_in_plain_words():
    from snapprune.summary import verdict

    assert verdict(0.84) == "better than before"  # e.g. after recovery
    assert verdict(1.0) == "about as good as before"
    assert verdict(1.2) == "a moderate loss"
    assert "recover" in verdict(2.0) and "severe" in verdict(4.0)
