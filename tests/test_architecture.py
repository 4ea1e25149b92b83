"""One place per concept: methods from the registry, families from adapters with groups, and
a package whose layers only reach downward."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from test_cli import _run
from tiny_models import FAMILIES, tiny_model, tiny_unsupported_moe, token_batch

import snapprune
from snapprune import Method, SnapPruneError, linear_weight, prune_model, prune_weight
from snapprune.cli import main
from snapprune.engine import register_method, unregister_method
from snapprune.engine.masks import lowest_k_mask, nm_mask, structured_mask
from snapprune.models import adapter_for
from snapprune.models.settings import PruneSettings
from snapprune.models.targets import target_layers
from snapprune.sweep import canonical_cell

PACKAGE = Path(snapprune.__file__).parent


def _random_mask(problem):
    """A toy method: random scores, no update (exercises the registry, not the maths)."""
    gen = torch.Generator().manual_seed(problem.rows * 1000 + problem.cols)
    scores = torch.rand(problem.weight.shape, generator=gen)
    pat = problem.pattern
    if pat.kind == "nm":
        mask = nm_mask(scores, pat.n, pat.m)
    elif pat.kind == "structured":
        mask = structured_mask(scores, problem.sparsity, problem.alpha).full()
    else:
        mask = lowest_k_mask(scores, problem.target_total)
    problem.weight[mask] = 0.0
    return mask


@pytest.fixture
def toy_method():
    method = register_method(Method(name="randomtoy", summary="random mask, no update",
                                    default_metric="magnitude", updates_weights=False,
                                    prune=_random_mask))
    yield method
    unregister_method("randomtoy")


def test_registered_method_works_through_every_entry_point(toy_method, tiny_dir, tmp_path,
                                                           capsys):
    w = torch.randn(8, 16)
    res = prune_weight(w, None, method="randomtoy", sparsity=0.25)
    assert res.mask.sum().item() == 32 and (res.weight[res.mask] == 0).all()
    assert torch.equal(res.weight[~res.mask], w[~res.mask])

    model = tiny_model("llama")
    run = prune_model(model, None, method="randomtoy", pattern="2:4", progress=False)
    assert run.achieved_sparsity == 0.5 and run.calibration_seconds == 0.0  # needs no data
    for named in target_layers(model).values():
        for module in named.values():
            zero = linear_weight(module) == 0
            assert (zero.reshape(zero.shape[0], -1, 4).sum(2) == 2).all()

    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    assert "randomtoy (random mask, no update)" in " ".join(capsys.readouterr().out.split())
    out = tmp_path / "pruned"
    code, err = _run(capsys, "prune", "--model", tiny_dir, "--method", "randomtoy",
                     "--sparsity", 0.3, "--out", out, "--quiet")
    assert code == 0, err
    assert json.loads((out / "snapprune_report.json").read_text())["method"] == "randomtoy"

    # The sweep folds what the declaration says cannot matter: block size, calibration.
    cell = canonical_cell("randomtoy", sparsity=0.3, blocksize=64, calib="c4")
    assert cell.blocksize is None and cell.calib is None and cell.percdamp is None


def test_registry_refuses_duplicates_and_unknown_names():
    with pytest.raises(SnapPruneError, match="already registered"):
        register_method(dataclasses.replace(snapprune.get_method("wanda"), summary="other"))
    with pytest.raises(SnapPruneError, match="unknown method 'obc'; choose one of magnitude"):
        snapprune.get_method("obc")


def test_prune_model_does_not_mutate_the_settings_passed_in():
    settings = PruneSettings(method="wanda", sparsity=0.5)
    run = prune_model(tiny_model("llama"), token_batch(2, 16), settings, sparsity=0.25,
                      progress=False)
    assert settings.sparsity == 0.5 and run.settings.sparsity == 0.25
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.sparsity = 0.1  # type: ignore[misc]


EXPECTED_GROUPS = {
    "llama": {"self_attn.q_proj": "attention.q", "self_attn.k_proj": "attention.k",
              "self_attn.v_proj": "attention.v", "self_attn.o_proj": "attention.o",
              "mlp.gate_proj": "mlp.in", "mlp.up_proj": "mlp.in", "mlp.down_proj": "mlp.out"},
    "opt": {"self_attn.q_proj": "attention.q", "self_attn.k_proj": "attention.k",
            "self_attn.v_proj": "attention.v", "self_attn.out_proj": "attention.o",
            "fc1": "mlp.in", "fc2": "mlp.out"},
    "gpt2": {"attn.c_attn": "attention.qkv", "attn.c_proj": "attention.o",
             "mlp.c_fc": "mlp.in", "mlp.c_proj": "mlp.out"},
    "gpt_neox": {"attention.query_key_value": "attention.qkv", "attention.dense": "attention.o",
                 "mlp.dense_h_to_4h": "mlp.in", "mlp.dense_4h_to_h": "mlp.out"},
    "phi3": {"self_attn.qkv_proj": "attention.qkv", "self_attn.o_proj": "attention.o",
             "mlp.gate_up_proj": "mlp.in", "mlp.down_proj": "mlp.out"},
}
EXPECTED_GROUPS["mistral"] = EXPECTED_GROUPS["qwen2"] = EXPECTED_GROUPS["llama"]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_block_parameter_is_covered_by_a_rule(family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    blocks = adapter.decoder_blocks(model)
    for block in blocks:
        rules, uncovered = adapter.coverage(block)
        assert uncovered == [], f"{family}: parameters no rule covers: {uncovered}"
        assert set(rules) == {n for n, _ in block.named_parameters()}
    roles = adapter.layer_roles(blocks[0])
    if family == "phi":
        assert adapter.generic and set(roles.values()) == {"linear"}
        assert adapter.describe(model)["generic_adapter"] is True
        return
    assert not adapter.generic and roles == EXPECTED_GROUPS[family]
    # Every prunable layer is in a group; the rest of the block is norms and biases.
    weights = {r.split(" ")[0] for r in rules.values() if r.endswith("weight")}
    assert {"attention.o", "mlp.in", "mlp.out"} <= weights
    heads = adapter.describe(model)["heads"]
    assert heads["heads"] == 4 and heads["head_dim"] == 16


def test_uncovered_parameters_are_reported():
    model = tiny_model("llama")
    block = model.model.layers[0]
    block.register_parameter("extra_scale", torch.nn.Parameter(torch.ones(3)))
    _, uncovered = adapter_for(model).coverage(block)
    assert uncovered == ["extra_scale"]
    assert adapter_for(model).describe(model)["uncovered_parameters"] == ["extra_scale"]


def test_a_mixture_of_experts_without_an_adapter_is_refused_in_one_line():
    model = tiny_unsupported_moe()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SnapPruneError, match="mixture-of-experts") as info:
        prune_model(model, token_batch(2, 16), method="wanda", sparsity=0.5, progress=False)
    assert "\n" not in str(info.value) and "qwen3_moe" in str(info.value)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


class _ExpertMLP(torch.nn.Module):
    def __init__(self, hidden: int, width: int) -> None:
        super().__init__()
        self.gate_proj = torch.nn.Linear(hidden, width, bias=False)
        self.up_proj = torch.nn.Linear(hidden, width, bias=False)
        self.down_proj = torch.nn.Linear(width, hidden, bias=False)


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_a_mixture_whose_code_keeps_one_module_per_expert_is_refused_in_one_line(family):
    """transformers 4 (and remote code) keep a ``ModuleList`` of per-expert MLPs (Mixtral under
    ``block_sparse_moe``): refused with the fix, before any weight changes, not half handled."""
    from tiny_models import tiny_moe_model

    model = tiny_moe_model(family)
    config = model.config
    for block in model.model.layers:
        experts = torch.nn.ModuleList(_ExpertMLP(config.hidden_size, 32) for _ in range(4))
        if family == "mixtral":  # transformers 4's name for the mixture
            block.block_sparse_moe = block.mlp
            del block.mlp
            block.block_sparse_moe.experts = experts
        else:
            block.mlp.experts = experts
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SnapPruneError, match="one module per expert") as info:
        prune_model(model, token_batch(2, 16), method="wanda", sparsity=0.5, progress=False)
    assert "\n" not in str(info.value) and "transformers>=5" in str(info.value)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def _imports(path: Path) -> set[str]:
    """Package-relative modules a file imports (``..models.x`` from ``engine/`` → ``models``)."""
    tree = ast.parse(path.read_text())
    here = path.relative_to(PACKAGE).parts[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(here[: len(here) - (node.level - 1)])
            target = [*base, *(node.module or "").split(".")] if node.module else base
            found.add(target[0] if target else "")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("snapprune."):
            found.add(node.module.split(".")[1])
    return found


LAYERS = {  # what each layer may import from the package (besides itself)
    "engine": {"errors"},
    "models": {"errors", "engine", "progress", "hub", "memory", "outputs"},
    "eval": {"errors", "data", "progress"},
    "data.py": {"errors", "hub"},
}


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_no_module_reaches_upward(layer):
    files = [PACKAGE / layer] if layer.endswith(".py") else sorted((PACKAGE / layer).rglob(
        "*.py"))
    own = layer.removesuffix(".py")
    for path in files:
        reached = {m for m in _imports(path) if m and m != own} - LAYERS[layer]
        assert not reached, f"{path.relative_to(PACKAGE)} imports {sorted(reached)}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["snapprune", *parts])


def _is_module(name: str) -> bool:
    relative = Path(*name.split(".")[1:]) if "." in name else Path()
    return (PACKAGE / relative).with_suffix(".py").is_file() or \
        (PACKAGE / relative / "__init__.py").is_file()


def _import_edges(path: Path) -> list[tuple[str, str | None]]:
    """``(module imported, name taken from it or None)`` for every import of the package, at
    any depth of the file (function-level imports too)."""
    here = _module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    edges = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            if not module.startswith("snapprune"):
                continue
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                edges.append((sub, None) if _is_module(sub) else (module, alias.name))
        elif isinstance(node, ast.Import):
            edges += [(a.name, None) for a in node.names if a.name.startswith("snapprune")]
    return edges


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the import graph, or ``None``."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle():
    """Modules import each other one way only (function-level imports count too): a cycle
    means two modules each need the other, a design to untangle, not to hide in a function.
    Edges into a package's ``__init__`` count like any other: ``from . import name`` runs the
    package's ``__init__``, which imports its modules."""
    graph = {_module_name(p): {m for m, _ in _import_edges(p)} - {_module_name(p)}
             for p in PACKAGE.rglob("*.py")}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_test_sees_edges_into_a_package_init(tmp_path):
    """The cycle the old test hid: report imported ``__version__`` from the package, whose
    ``__init__`` imports run, which imports report."""
    report = PACKAGE / "report.py"
    edges = {m for m, _ in _import_edges(report)}
    assert "snapprune" not in edges  # the version has a module of its own now
    graph = {"snapprune.report": {"snapprune"}, "snapprune": {"snapprune.run"},
             "snapprune.run": {"snapprune.report"}}
    assert find_cycle(graph) == ["snapprune", "snapprune.run", "snapprune.report", "snapprune"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_imports_another_modules_private_name():
    for path in PACKAGE.rglob("*.py"):
        own = _module_name(path)
        for module, name in _import_edges(path):
            if name is not None and name.startswith("_") and not name.startswith("__") \
                    and module != own:
                raise AssertionError(f"{path.relative_to(PACKAGE)} imports {name} from {module}")
            if name is None and module.rsplit(".", 1)[-1].startswith("_") \
                    and not module.endswith("__init__") and module != own:
                raise AssertionError(f"{path.relative_to(PACKAGE)} imports {module}")
