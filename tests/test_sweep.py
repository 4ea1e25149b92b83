"""``snapprune sweep``: grid expansion, exact reuse of the dense model, resume, report."""

from __future__ import annotations

import json

import pytest
from conftest import C4_FILE, WIKI_TEST
from test_cli import _run
from transformers import AutoModelForCausalLM, AutoTokenizer

from snapprune import SnapPruneError
from snapprune.data import calibration_windows, evaluation_ids
from snapprune.eval.perplexity import perplexity
from snapprune.models.prune import prune_model
from snapprune.sweep import (
    CELLS_FILE,
    canonical_cell,
    covers,
    describe_evaluation,
    expand_grid,
    load_plan,
    read_cells,
)


def test_cells_drop_settings_that_cannot_matter():
    wanda = canonical_cell("wanda", sparsity=0.5, blocksize=64, alpha=0.0, calib="c4")
    assert wanda.blocksize is None and wanda.alpha is None and wanda.percdamp is None
    assert wanda.metric == "wanda" and wanda.calib == "c4"
    magnitude = canonical_cell("magnitude", sparsity=0.5, calib="x.txt", nsamples=8)
    assert magnitude.calib is None and magnitude.nsamples is None
    nm = canonical_cell("thanos", pattern="2:4", sparsity=0.7)
    assert nm.sparsity == 0.5 and nm.blocksize == 128
    structured = canonical_cell("thanos", pattern="structured", sparsity=0.3, alpha=0.1)
    assert structured.alpha == 0.1 and structured.blocksize is None  # one shared solve
    assert canonical_cell("sparsegpt", metric=None).key("m") == canonical_cell(
        "sparsegpt", metric="obs").key("m")


def test_grid_expansion_merges_equal_cells_and_refuses_bad_settings():
    grid = expand_grid("g", {"method": ["dense", "magnitude", "thanos"],
                             "pattern": ["unstructured", "structured"],
                             "alpha": [0.0, 0.1], "blocksize": [64, 128]})
    # dense 1; magnitude 1 unstructured + 2 structured α; thanos 2 B × 1 + 2 α (no B)
    assert len(grid.cells) == 1 + 3 + 4
    with pytest.raises(SnapPruneError, match="unknown setting"):
        expand_grid("g", {"method": ["thanos"], "sparsities": [0.5]})
    with pytest.raises(SnapPruneError, match="unknown method"):
        expand_grid("g", {"method": ["obc"]})
    with pytest.raises(SnapPruneError, match=r"sparsity must be in \[0, 1\)"):
        expand_grid("g", {"method": ["wanda"], "sparsity": [1.5]})


def test_sweep_file_and_coverage(tmp_path):
    spec = {"model": "m", "defaults": {"nsamples": 4},
            "evaluation": {"ppl": ["wikitext2"], "eval_seqlen": 64, "zeroshot": ["arc_easy"],
                           "limit": 5},
            "grids": [{"name": "a", "zeroshot": True, "method": ["thanos"]},
                      {"name": "b", "method": ["thanos", "wanda"]}]}
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(spec))
    plan = load_plan(path)
    requests = plan.requests()
    assert [(c.method, zs, names) for c, zs, names in requests] == [
        ("thanos", True, ["a", "b"]), ("wanda", False, ["b"])]
    assert requests[0][0].nsamples == 4
    with_zs = describe_evaluation(plan.evaluation, True)
    without = describe_evaluation(plan.evaluation, False)
    assert covers({"evaluation": with_zs}, without)
    assert not covers({"evaluation": without}, with_zs)
    with pytest.raises(SnapPruneError, match="not found"):
        load_plan(tmp_path / "missing.json")


def _sweep_args(tiny_dir, out, methods="wanda,thanos", sparsity="0.5"):
    return ["sweep", "--model", tiny_dir, "--method", methods, "--pattern", "unstructured",
            "--sparsity", sparsity, "--calib", C4_FILE, "--nsamples", 2, "--seqlen", 64,
            "--ppl", WIKI_TEST, "--eval-seqlen", 64, "--max-windows", 2, "--out", out,
            "--quiet"]


def test_tiny_sweep_is_exact_and_resumes(tiny_dir, tmp_path, capsys):
    out = tmp_path / "sweep"
    code, err = _run(capsys, *_sweep_args(tiny_dir, out))
    assert code == 0, err
    assert "0 already finished" in err and "2 to run" in err
    lines = (out / CELLS_FILE).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["cell"]["method"] for r in records] == ["wanda", "thanos"]
    assert "| method |" in (out / "results.md").read_text()

    # The second cell ran on restored dense weights with cached first-block inputs: it must
    # equal a fresh model pruned on its own.
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    calibration = calibration_windows(str(C4_FILE), tokenizer, nsamples=2, seqlen=64, seed=0)
    prune_model(model, calibration, method="thanos", sparsity=0.5, progress=False)
    expected = perplexity(model, evaluation_ids(str(WIKI_TEST), tokenizer), seqlen=64,
                          max_windows=2, progress=False).perplexity
    assert records[1]["perplexity"][WIKI_TEST] == pytest.approx(expected, rel=1e-5)
    assert records[1]["achieved_sparsity"] == pytest.approx(0.5, abs=1e-6)
    assert records[0]["perplexity"] != records[1]["perplexity"]

    # Same command again: nothing recomputed, file untouched.
    before = (out / CELLS_FILE).read_bytes()
    code, err = _run(capsys, *_sweep_args(tiny_dir, out))
    assert code == 0, err
    assert "2 already finished" in err and "0 to run" in err
    assert (out / CELLS_FILE).read_bytes() == before

    # Interrupted while writing the second cell: only that cell runs again.
    (out / CELLS_FILE).write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])
    code, err = _run(capsys, *_sweep_args(tiny_dir, out))
    assert code == 0, err
    assert "1 already finished" in err and "1 to run" in err
    again = read_cells(out)
    assert len(again) == 2
    assert again[records[1]["key"]]["perplexity"] == pytest.approx(records[1]["perplexity"])

    # A grid grown by one sparsity runs only the new cells.
    code, err = _run(capsys, *_sweep_args(tiny_dir, out, sparsity="0.5,0.7"))
    assert code == 0, err
    assert "2 already finished" in err and "2 to run" in err
    assert len(read_cells(out)) == 4


def test_sweep_plots_and_render_only(tiny_dir, tmp_path, capsys):
    out = tmp_path / "plots"
    code, err = _run(capsys, *_sweep_args(tiny_dir, out, methods="dense,magnitude",
                                          sparsity="0.2,0.4,0.6"))
    assert code == 0, err
    records = list(read_cells(out).values())
    assert len(records) == 4
    assert all("timing" not in r or r["timing"]["calibration_forward_seconds"] == 0
               for r in records)  # magnitude needs no forward pass
    png = out / "ppl_vs_sparsity.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "ppl_vs_blocksize.png").exists()  # nothing swept there
    png.unlink()
    code, err = _run(capsys, *_sweep_args(tiny_dir, out, methods="dense,magnitude",
                                          sparsity="0.2,0.4,0.6"), "--render-only")
    assert code == 0, err
    assert png.exists()


@pytest.mark.parametrize("change, message", [
    (("--method", "obc"), "unknown method"),
    (("--sparsity", "0.5,x"), "cannot read the list"),
    (("--calib", "missing.json.gz"), "calibration source"),
    (("--pattern", "3:2"), "not a valid N:M"),
])
def test_sweep_refusals_are_one_line(tiny_dir, tmp_path, capsys, change, message):
    args = _sweep_args(tiny_dir, tmp_path / "out")
    i = args.index(change[0])
    args[i + 1] = change[1]
    code, err = _run(capsys, *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
