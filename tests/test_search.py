"""``search``: the structure that fits a budget with the least held-out calibration loss.

The costs are checked against the models and files themselves (parameters counted after the
cut, tensor bytes as gguf-py reads them from the written file); the grid against its
definition (every structure within the budget, the MLP as wide as the budget allows); the
choice against the losses (the least wins, and the saved model is that structure, equal to the
same prune-depth + shrink job run on its own); bad budgets refused in one line before any
work."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import C4_FILE
from test_bad_inputs import _assert_refused, _run
from tiny_models import DEEP_LAYERS, deep_llama, token_batch
from transformers import AutoModelForCausalLM, AutoTokenizer

from snapprune import SnapPruneError
from snapprune.jobs import CalibrationSpec, EvaluationSpec, Job, OutputSpec
from snapprune.models.depth import attention_free
from snapprune.models.search_settings import SearchSettings
from snapprune.models.settings import DepthSettings, QuantizeSettings, ShrinkSettings
from snapprune.models.structure_budget import Budget, Structure, geometry, grid, widest
from snapprune.run import execute


def _job(model_dir, *steps, fmt="hf") -> Job:
    return Job(model=str(model_dir), steps=steps,
               calibration=CalibrationSpec(str(C4_FILE), 8, 32),
               evaluation=EvaluationSpec(ppl=(), dense=False),
               output=OutputSpec(format=fmt, samples=False))


def _structure_job(model_dir, structure: Structure, units: int, fmt: str, *after,
                   per_group: int = 2):
    steps = []
    if structure.blocks or structure.attention:
        steps.append(DepthSettings(blocks=structure.blocks, attention=structure.attention))
    if structure.width < units or structure.heads:
        steps.append(ShrinkSettings("thanos", mlp=1 - structure.width / units,
                                    heads=structure.heads / per_group, multiple_of=32))
    return _job(model_dir, *steps, *after, fmt=fmt)


@pytest.mark.parametrize("structure,embedding", [
    (Structure(2, 0, 128), None), (Structure(0, 3, 64), None),
    (Structure(1, 2, 96), "iq4_nl"), (Structure(3, 1, 32), "q4_0")])
def test_a_structures_cost_is_its_cut_model_and_its_gguf_file(structure, embedding, deep_dir,
                                                              tmp_path):
    """Parameters: counted on the model after prune-depth and shrink; bytes: the q8_0 GGUF
    file's tensors as gguf-py reads them (the header apart), the embedding and output matrix
    at q8_0 or at the type asked for; bytes read per token: every tensor but an untied token
    embedding (untied here)."""
    from gguf import GGUFReader

    dense = AutoModelForCausalLM.from_pretrained(deep_dir)
    measured = geometry(dense, "q8_0", multiple_of=32, embedding=embedding or "q8_0")
    assert measured.dense.params == sum(p.numel() for p in dense.parameters())
    out = tmp_path / "cut"
    job = _structure_job(deep_dir, structure, measured.units, "gguf",
                         QuantizeSettings("q8_0", embedding_type=embedding))
    if not job.steps[:-1]:
        pytest.skip("the dense structure")
    outcome = execute(job, out, progress=False, announce=False)
    cost = measured.cost(structure)
    assert cost.params == sum(p.numel() for p in outcome.model.parameters())
    tensors = GGUFReader(str(out / "model.gguf")).tensors
    assert cost.bytes == sum(int(t.n_bytes) for t in tensors)
    types = {t.name: t.tensor_type.name.lower() for t in tensors}
    assert types["token_embd.weight"] == types["output.weight"] == (embedding or "q8_0")
    assert types["blk.0.ffn_down.weight"] == "q8_0"
    names = {t.name for t in tensors}
    read = sum(int(t.n_bytes) for t in tensors
               if t.name != "token_embd.weight" or "output.weight" not in names)
    assert cost.read == read  # an untied token embedding is read a row per token


@pytest.fixture(scope="module")
def headed_dir(tmp_path_factory, tokenizer_dir):
    """A LLaMA whose heads (32 wide) are whole q8_0 blocks: 4 blocks, 4 query heads over 2
    key/value heads, MLP 128."""
    from transformers import LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=128,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=32, max_position_embeddings=256)
    out = tmp_path_factory.mktemp("headed")
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize("structure", [Structure(0, 0, 128, 1), Structure(1, 1, 96, 1)])
def test_a_head_cut_costs_what_its_cut_model_and_file_hold(structure, headed_dir, tmp_path):
    """One query head per key/value group out of every block that keeps its attention: its
    rows of q and columns of o, in parameters and in the q8_0 file's bytes."""
    from gguf import GGUFReader

    dense = AutoModelForCausalLM.from_pretrained(headed_dir)
    measured = geometry(dense, "q8_0", multiple_of=32)
    assert (measured.groups, measured.per_group) == (2, 2)
    out = tmp_path / "cut"
    outcome = execute(_structure_job(headed_dir, structure, measured.units, "gguf",
                                     QuantizeSettings("q8_0")), out, progress=False,
                      announce=False)
    cost = measured.cost(structure)
    assert cost.params == sum(p.numel() for p in outcome.model.parameters())
    tensors = GGUFReader(str(out / "model.gguf")).tensors
    assert cost.bytes == sum(int(t.n_bytes) for t in tensors)


def test_the_grid_cuts_heads_only_when_asked_and_keeps_one_per_group(headed_dir):
    dense = AutoModelForCausalLM.from_pretrained(headed_dir)
    measured = geometry(dense, "q8_0", multiple_of=32)
    budget = Budget("bytes", int(measured.dense.bytes * 0.8))
    assert all(s.heads == 0 for s in grid(measured, budget, narrowest=32))
    structures = grid(measured, budget, narrowest=32, heads=True)
    assert {s.heads for s in structures} == {0, 1}  # 2 per group: at most 1 goes
    for s in structures:
        assert budget.fits(measured.cost(s))
        assert widest(measured, s.blocks, s.attention, budget, 32, s.heads) == s.width
    # a cut head buys MLP width: the same depth and attention with a head cut is wider
    pairs = {(s.blocks, s.attention, s.heads): s.width for s in structures}
    assert any(pairs[(d, a, 1)] > pairs[(d, a, 0)] for d, a, h in pairs if h == 1
               and (d, a, 0) in pairs and pairs[(d, a, 0)] < measured.units)
    without = grid(measured, budget, narrowest=32, heads=True, heads_with_attention=False)
    assert not any(s.heads and s.attention for s in without)


def test_a_search_with_heads_tries_head_cuts_and_reports_them(headed_dir, tmp_path):
    settings = SearchSettings(target_params=0.8, points=2, windows=2, heads=True)
    out = tmp_path / "searched"
    outcome = execute(_job(headed_dir, settings, fmt="gguf"), out, progress=False,
                      announce=False)
    run = outcome.run_of("search")
    assert any(t.structure.heads for t in run.tried) and not run.notes
    report = json.loads((out / "snapprune_report.json").read_text())
    tried = report["search"]["tried"]
    assert {t["heads_removed_per_group"] for t in tried} == {0, 1}
    assert all(t["heads_per_group_dense"] == 2 for t in tried)
    best = run.best.structure
    kept = outcome.model.model.layers
    assert all(b.self_attn.q_proj.out_features == (2 - best.heads) * 2 * 32 for b in kept
               if not attention_free(b))


def test_every_structure_of_the_grid_fits_the_budget_with_the_widest_mlp(deep_dir):
    dense = AutoModelForCausalLM.from_pretrained(deep_dir)
    measured = geometry(dense, "q4_0", multiple_of=32)
    for currency in ("params", "bytes", "read"):
        for share in (0.85, 0.7, 0.55):
            budget = Budget(currency, int(getattr(measured.dense, currency) * share))
            structures = grid(measured, budget, points=3, narrowest=32)
            assert structures and len(set(structures)) == len(structures)
            for s in structures:
                assert budget.fits(measured.cost(s))
                wider = Structure(s.blocks, s.attention, s.width + measured.step)
                assert s.width == measured.units or not budget.fits(measured.cost(wider))
                assert widest(measured, s.blocks, s.attention, budget, 32) == s.width
            assert all(s.attention < measured.blocks - s.blocks for s in structures)
            blocks = sorted({s.blocks for s in structures})
            assert blocks[0] == 0 and len(blocks) >= 2  # depth is searched, from none


def test_the_grid_without_attention_removes_none_and_a_budget_out_of_reach_is_refused(
        deep_dir):
    dense = AutoModelForCausalLM.from_pretrained(deep_dir)
    measured = geometry(dense, None, multiple_of=32)
    budget = Budget("params", int(measured.dense.params * 0.8))
    assert all(s.attention == 0 for s in grid(measured, budget, attention=False,
                                              narrowest=32))
    tiny = Budget("params", measured.fixed.params)  # the embeddings alone
    with pytest.raises(SnapPruneError, match="no structure reaches the target"):
        grid(measured, tiny, narrowest=32)


def test_the_search_keeps_the_least_loss_and_saves_that_structure(deep_dir, tmp_path):
    out = tmp_path / "searched"
    settings = SearchSettings(target_params=0.8, points=2, windows=4)
    outcome = execute(_job(deep_dir, settings, fmt="gguf"), out, progress=False,
                      announce=False)
    run = outcome.run_of("search")
    losses = [t.loss for t in run.tried]
    assert len(run.tried) >= 3 and run.chosen == losses.index(min(losses))
    assert all(t.cost.params <= run.budget.limit for t in run.tried)
    assert any(t.structure.attention for t in run.tried)  # gguf: attention is searched
    report = json.loads((out / "snapprune_report.json").read_text())
    assert report["search"]["chosen"] == run.chosen
    assert len(report["search"]["tried"]) == len(run.tried)
    assert (out / "search.png").is_file()
    # the saved model is that structure, as the same steps give it on their own
    best = run.best.structure
    alone = execute(_structure_job(deep_dir, best, run.geometry.units, "gguf"),
                    tmp_path / "alone", progress=False, announce=False)
    ids = token_batch(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(outcome.model(ids).logits, alone.model(ids).logits)


def test_structures_are_scored_on_windows_they_were_not_cut_on(deep_dir):
    from snapprune.steps.search import _held_out
    from snapprune.workbench import Workbench

    job = _job(deep_dir)
    bench = Workbench(AutoModelForCausalLM.from_pretrained(deep_dir),
                      AutoTokenizer.from_pretrained(deep_dir))
    calibration, _ = bench.calibration_ids(job.calibration)
    held_out = _held_out(bench, job, SearchSettings(target_params=0.8, windows=4))
    assert held_out.shape == (4, calibration.shape[1])
    seen = {tuple(w.tolist()) for w in calibration}
    assert not any(tuple(w.tolist()) in seen for w in held_out)


def test_a_standard_format_keeps_every_attention_sub_layer(deep_dir, tmp_path):
    settings = SearchSettings(target_params=0.85, points=2, windows=2)
    outcome = execute(_job(deep_dir, settings, fmt="hf"), tmp_path / "hf", progress=False,
                      announce=False)
    run = outcome.run_of("search")
    assert all(t.structure.attention == 0 for t in run.tried)
    assert "attention" in run.notes[0]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert loaded.config.num_hidden_layers == DEEP_LAYERS - run.best.structure.blocks


@pytest.mark.parametrize("extra, fragment", [
    (("--target-params", "2000000000"), "not below the dense model"),
    (("--target-params", "0.8", "--target-size", "1"), "exactly one target"),
    (("--target-params", "1000"), "no structure reaches the target"),
    (("--target-decode", "0.9"), "more than 1"),
    (("--target-size", "0.05", "--format", "hf"), "counts a GGUF file"),
    (("--target-params", "0.8", "--gguf-type", "w4g128"), "not a llama.cpp block type"),
])
def test_bad_budgets_are_refused_in_one_line_before_any_work(deep_dir, tmp_path, capsys,
                                                            extra, fragment):
    out = tmp_path / "refused"
    code, err = _run(capsys, "search", "--model", deep_dir, "--calib", C4_FILE, "--nsamples",
                     4, "--seqlen", 32, "--no-eval", "--no-samples", "--out", out, *extra)
    _assert_refused(code, err, fragment, out=out)


def test_a_size_target_then_quantisation_in_one_job_gives_a_file_of_the_counted_bytes(
        deep_dir, tmp_path):
    """``search`` to a GGUF size at q4_0, then ``quantize`` q4_0 in the same job: the file's
    tensors take exactly the bytes the search counted (its header is what was set aside for
    metadata, at most), and the file is within the target."""
    from gguf import GGUFReader

    from snapprune.steps.quantize import metadata_bytes

    dense = AutoModelForCausalLM.from_pretrained(deep_dir)
    measured = geometry(dense, "q4_0", multiple_of=32)
    job = _job(deep_dir, SearchSettings(target_size=measured.dense.bytes * 0.75 / 1e6,
                                        points=2, windows=2),
               QuantizeSettings("q4_0", method="rtn"), fmt="gguf")
    out = tmp_path / "sized"
    outcome = execute(job, out, progress=False, announce=False)
    run = outcome.run_of("search")
    metadata = metadata_bytes(job)
    tensors = GGUFReader(str(out / "model.gguf")).tensors
    assert sum(int(t.n_bytes) for t in tensors) == run.best.cost.bytes - metadata
    assert (out / "model.gguf").stat().st_size <= run.budget.limit  # the header's estimate held


def test_the_estimate_counts_every_structure(deep_dir, monkeypatch):
    """The announced time covers every structure's passes and solves, not one job's. The probe's
    clock is fixed so the two estimates differ only by what they count (timings are noisy)."""
    from snapprune import estimate
    from snapprune.estimate import estimate_job
    from snapprune.steps import resolve_job
    from snapprune.workbench import Workbench

    bench = Workbench(AutoModelForCausalLM.from_pretrained(deep_dir),
                      AutoTokenizer.from_pretrained(deep_dir))
    search, _ = resolve_job(_job(deep_dir, SearchSettings(target_params=0.8, points=2)))
    shrink, _ = resolve_job(_job(deep_dir, ShrinkSettings("thanos", mlp=0.3)))
    monkeypatch.setattr(estimate, "_timed", lambda fn: (fn(), 0.01)[1])
    searched, single = estimate_job(bench, search), estimate_job(bench, shrink)
    structures = len(grid(geometry(bench.model), Budget("params", int(
        geometry(bench.model).dense.params * 0.8)), points=2, narrowest=32))
    assert structures >= 3
    assert searched.calibration_seconds > 2.5 * structures * single.calibration_seconds


def test_a_family_without_a_depth_and_width_adapter_is_refused_in_one_line():
    from tiny_models import tiny_moe_model

    with pytest.raises(SnapPruneError, match="no depth and width adapter") as info:
        geometry(tiny_moe_model("qwen3_moe"), "q4_0")
    assert "\n" not in str(info.value)


def test_a_size_target_counted_in_a_mix_needs_a_block_type():
    from snapprune.steps.search import _plan

    model = deep_llama()
    target = geometry(model, "q4_0").dense.bytes * 0.8 / 1e6
    job = _job_for_plan(target, QuantizeSettings("Q4_K_M"))
    with pytest.raises(SnapPruneError, match="give --gguf-type"):
        _plan(job.settings("search"), job, model)
    job = _job_for_plan(target, QuantizeSettings("Q4_K_M"), gguf_type="q4_0")
    run, structures = _plan(job.settings("search"), job, model)
    assert run.counted_as == "q4_0" and structures


def _job_for_plan(target: float, quantize, **search):
    return Job(model="unused", steps=(SearchSettings(target_size=target, **search), quantize),
               calibration=CalibrationSpec(str(C4_FILE), 4, 32),
               output=OutputSpec(format="gguf", samples=False))
