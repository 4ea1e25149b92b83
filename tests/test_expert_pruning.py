"""``prune-experts``: whole experts removed with their router rows.

The reference for a removal is transformers' own fused model with that expert's router logit
set to −∞ (the modelling module's ``F.linear`` wrapped for the router's weight alone), so the
re-routing of its tokens is the library's, not snapprune's.
"""

from __future__ import annotations

import importlib
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import C4_FILE
from test_moe import _expert_inputs, _job, _routed_by_hand
from tiny_models import MOE_FAMILIES, tiny_model, tiny_moe_model, token_batch
from transformers import AutoModelForCausalLM

from snapprune import SnapPruneError
from snapprune.cli import main
from snapprune.models.adapters import adapter_for
from snapprune.models.expert_pruning import cut_experts, plan_counts, prune_experts
from snapprune.models.experts import expert_count
from snapprune.models.settings import ExpertSettings, PruneSettings, QuantizeSettings
from snapprune.run import execute

CALIBRATION = token_batch(8, 32)


class _MaskedRouterLinear:
    """``torch.nn.functional`` with the router's logits of some experts set to −∞."""

    def __init__(self, masked: dict[int, list[int]]) -> None:
        self.masked = masked  # id(router weight) -> experts

    def __getattr__(self, name):
        return getattr(F, name)

    def linear(self, x, weight, bias=None):
        y = F.linear(x, weight, bias)
        if id(weight) in self.masked:
            y = y.clone()
            y[..., self.masked[id(weight)]] = -torch.inf
        return y


def _masked_reference(family: str, masked: dict[int, list[int]], monkeypatch):
    """The original fused model whose routers in blocks ``masked`` never pick those experts."""
    model = tiny_moe_model(family)
    model.config._experts_implementation = "eager"
    module = importlib.import_module(type(model).__module__)
    router = adapter_for(model).moe.router
    routers = {id(model.model.layers[b].get_submodule(router).weight): experts
               for b, experts in masked.items()}
    monkeypatch.setattr(module, "F", _MaskedRouterLinear(routers))
    return model


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_removing_experts_equals_the_model_with_their_router_logits_at_minus_infinity(
        family, monkeypatch):
    removed = {0: [1], 1: [0, 3]}
    model = tiny_moe_model(family)
    cut_experts(model, removed)
    assert len(adapter_for(model).decoder_blocks(model)[1].mlp.experts) == 2
    assert model.model.layers[1].get_submodule(adapter_for(model).moe.router).weight.shape[0] == 2
    assert expert_count(model.config, adapter_for(model).moe) == 3
    # the *ForCausalLM's own copy, where the family keeps one (the router's auxiliary loss)
    assert getattr(model, "num_experts", 3) == 3
    reference = _masked_reference(family, removed, monkeypatch)
    ids = token_batch(2, 24, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits,
                                   rtol=1e-5, atol=1e-5)


def _mixture_outputs(model, block: int = 0):
    """``(mixture output, block output)`` of ``block`` over the calibration windows."""
    seen = {"mixture": [], "block": []}
    layer = model.model.layers[block]
    hooks = [layer.mlp.register_forward_hook(
                 lambda _m, _a, out: seen["mixture"].append(out[0] if isinstance(out, tuple)
                                                            else out)),
             layer.register_forward_hook(
                 lambda _m, _a, out: seen["block"].append(out[0] if isinstance(out, tuple)
                                                          else out))]
    with torch.no_grad():
        model(CALIBRATION, use_cache=False)
    for handle in hooks:
        handle.remove()
    return (torch.cat([x.reshape(-1, x.shape[-1]) for x in seen["mixture"]]),
            torch.cat([x.reshape(-1, x.shape[-1]) for x in seen["block"]]))


@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe"])
def test_the_scores_follow_their_definitions(family, monkeypatch):
    hidden, index, weights, fused = _routed_by_hand(family)
    model = tiny_moe_model(family)
    _, run = prune_experts(model, CALIBRATION, ExpertSettings(remove=1, score="error"),
                           progress=False)
    block = run.blocks[0]
    dense_mixture, dense_block = _mixture_outputs(_masked_reference(family, {}, monkeypatch))
    for e in range(4):
        routed = (index == e)
        assert block.tokens[e] == int(routed.any(-1).sum())
        _, a = _expert_inputs(hidden, index, fused, e)
        output = a @ fused.down_proj[e].detach().T
        gate = weights[routed.any(-1)][routed[routed.any(-1)]]
        reap = float((gate * output.norm(dim=-1)).mean())
        assert block.reap[e] == pytest.approx(reap, rel=1e-4)
        masked_mixture, _ = _mixture_outputs(_masked_reference(family, {0: [e]}, monkeypatch))
        cost = float(((masked_mixture - dense_mixture).pow(2).sum(-1)
                      / dense_block.pow(2).sum(-1)).mean())
        assert block.errors[e] == pytest.approx(cost, rel=1e-3, abs=1e-9)
    assert block.ranking == sorted(range(4), key=lambda e: (block.errors[e], e))
    assert block.removed == [block.ranking[0]]


def test_scoring_holds_one_block_on_the_device_at_a_time(monkeypatch):
    """A GPU smaller than the model: each block goes to ``--device`` alone, and back."""
    import contextlib

    from snapprune.models import expert_pruning

    moved = []
    real = expert_pruning.blocks_on

    @contextlib.contextmanager
    def recording(blocks, device):
        moved.append(len(list(blocks)))
        with real(blocks, device):
            yield

    monkeypatch.setattr(expert_pruning, "blocks_on", recording)
    model = tiny_moe_model("qwen3_moe")
    prune_experts(model, CALIBRATION, ExpertSettings(remove=1), progress=False)
    assert moved == [1] * len(model.model.layers)


def test_sensitivity_gives_each_block_its_count_for_the_same_total():
    model = tiny_moe_model("mixtral")
    _, run = prune_experts(model, CALIBRATION,
                           ExpertSettings(remove=1, allocation="sensitivity"), progress=False)
    assert sum(len(b.removed) for b in run.blocks) == 2
    assert all(len(b.tokens) - len(b.removed) >= 2 for b in run.blocks)  # top-k 2
    costs = [b.curve.at(len(b.removed)) for b in run.blocks]
    for other in ((0, 2), (2, 0), (1, 1)):
        assert sum(costs) <= sum(b.curve.at(k) for b, k in zip(run.blocks, other,
                                                                strict=True)) + 1e-12


def test_merging_averages_a_removed_expert_into_its_most_similar_by_routed_tokens():
    model = tiny_moe_model("qwen3_moe")
    experts = adapter_for(model).decoder_blocks(model)[0].mlp.experts
    before = [{n: p.detach().clone() for n, p in experts[e].named_parameters()}
              for e in range(4)]
    tokens = [10, 30, 50, 70]
    merges = cut_experts(model, {0: [1]}, merge=True, tokens={0: tokens, 1: tokens})
    target = merges[0][1]
    flat = [torch.cat([w.reshape(-1) for w in b.values()]) for b in before]
    similarity = {k: float(F.cosine_similarity(flat[1], flat[k], dim=0)) for k in (0, 2, 3)}
    assert target == max(similarity, key=similarity.get)
    position = [0, 2, 3].index(target)
    for name, value in experts[position].named_parameters():
        want = (tokens[target] * before[target][name] + 30 * before[1][name]) / (
            tokens[target] + 30)
        torch.testing.assert_close(value, want)


def test_expert_pruned_pruned_and_quantised_moe_reloads_with_the_same_logits(moe_dir,
                                                                              tmp_path):
    out = tmp_path / "e2"
    steps = (ExpertSettings(keep=0.5), PruneSettings(method="thanos", sparsity=0.5),
             QuantizeSettings(scheme="w4g32"))
    outcome = execute(_job(moe_dir, *steps), out, progress=False, announce=False)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.num_experts == 2
    assert loaded.model.layers[0].mlp.gate.weight.shape[0] == 2
    ids = token_batch(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, outcome.model(ids).logits)
    report = json.loads((out / "snapprune_report.json").read_text())
    section = report["experts_removed"]
    assert section["experts_before"] == 8 and section["experts_after"] == 4
    assert all(len(b["removed"]) == 2 for b in section["blocks"])
    # the thanos step saw the kept experts only: their projections in the layer records
    names = {r["name"] for r in report["layers"]}
    assert "model.layers.0.mlp.experts.1.down_proj" in names
    assert "model.layers.0.mlp.experts.2.down_proj" not in names


def _cli(capsys, *argv) -> tuple[int, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize(("extra", "fragment"), [
    (("--keep", "0.25"), "fewer than the 2 the router picks"),
    (("--remove", "1", "--allocation", "sensitivity"), "no standard config"),
    (("--keep", "0.5", "--remove", "1"), "one of them"),
])
def test_bad_expert_budgets_are_refused_in_one_line(moe_dir, tmp_path, capsys, extra,
                                                    fragment):
    out = tmp_path / "refused"
    code, err = _cli(capsys, "prune-experts", "--model", moe_dir, "--calib", C4_FILE,
                     "--nsamples", 2, "--seqlen", 16, "--out", out, "--quiet", "--no-eval",
                     "--no-samples", *extra)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and fragment in lines[0], err
    assert not out.exists()


def test_a_dense_model_is_refused_by_prune_experts():
    with pytest.raises(SnapPruneError, match="not a mixture of experts"):
        plan_counts(tiny_model("llama"), ExpertSettings(keep=0.5))


def test_a_router_that_picks_by_group_is_refused_in_one_line():
    """DeepSeek-V3's routing (n_group 8): experts are picked within groups, which removing
    some would unbalance; refused before any work."""
    from tiny_models import tiny_glm4_moe

    model = tiny_glm4_moe(dense_blocks=0)
    model.config.n_group = 2
    with pytest.raises(SnapPruneError, match="group by group"):
        plan_counts(model, ExpertSettings(remove=1))
