"""Seeded fuzzing of what users hand snapprune: a saved checkpoint (config.json,
model.safetensors), a GGUF file and a recipe, each corrupted at random (truncated at a random
offset, random bytes flipped, a key deleted, a value's type changed, a tensor dropped or
reshaped, a header field broken). Every corruption either loads or is refused with a
one-line ``SnapPruneError``; any other exception is a failure, listed with its input."""

from __future__ import annotations

import json
import random
import shutil
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from snapprune import SnapPruneError, read_recipe
from snapprune.cli import main
from snapprune.models.loading import load_model

SEED = 20_251_203
CHECKPOINT_CASES = 300
GGUF_CASES = 150
RECIPE_CASES = 300
CLI_CASES = 30
BUDGET_SECONDS = 60
"""All four fuzz tests together, on two CPU cores (each asserts its share)."""
ODD_VALUES = ("abc", [1, 2], {"a": 1}, None, -1, 0, 10**12, 0.5, True, "")
"""What a value's type is changed to."""

RECIPE = """\
snapprune_recipe: 1
model: MODEL
dtype: auto
steps:
- prune:
    method: wanda
    pattern: unstructured
    sparsity: 0.5
    alpha: 0.0
    blocksize: 128
    percdamp: 0.01
    metric: null
    include: []
    exclude: []
calibration:
  source: c4-sample
  nsamples: 2
  seqlen: 32
  seed: 0
evaluation:
  ppl: [wikitext2-test]
  seqlen: 32
  max_windows: 1
  zeroshot: []
  limit: null
  dense: false
execution:
  device: cpu
  batch_size: 8
  activations: auto
  layer_errors: true
  deterministic: false
  stream: null
output:
  format: hf
  samples: false
"""
"""A recipe as snapprune writes one (``snapprune_recipe.yaml`` of a prune run)."""

# -- the inputs ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def micro(tokenizer_dir, tmp_path_factory) -> Path:
    """A one-layer LLaMA (hidden 32) with the trained test tokenizer: small enough that a
    successful load takes a few hundredths of a second."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=64, bos_token_id=0, eos_token_id=0)
    out = tmp_path_factory.mktemp("micro") / "model"
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def micro_gguf(micro, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("micro_gguf") / "q8"
    code = main(["quantize", "--model", str(micro), "--method", "rtn", "--scheme", "q8_0",
                 "--format", "gguf", "--out", str(out), "--quiet", "--no-eval",
                 "--no-samples"])
    assert code == 0
    return out / "model.gguf"


# -- corruptions: each changes one file in place and says what it did ----------------------

def _truncate(path: Path, rng: random.Random) -> str:
    data = path.read_bytes()
    cut = rng.randrange(len(data))
    path.write_bytes(data[:cut])
    return f"{path.name} truncated at byte {cut}"


def _flip(path: Path, rng: random.Random, head: int | None = None) -> str:
    """Flip 1-8 random bytes, within the first ``head`` bytes where the structure lives."""
    data = bytearray(path.read_bytes())
    limit = min(len(data), head or len(data))
    spots = sorted(rng.randrange(limit) for _ in range(rng.randint(1, 8)))
    for spot in spots:
        data[spot] ^= rng.randint(1, 255)
    path.write_bytes(bytes(data))
    return f"{path.name} bytes {spots} flipped"


def _paths(tree, prefix: tuple = ()) -> list[tuple]:
    """Every key path of a JSON/YAML tree (through dicts and lists)."""
    out = []
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) \
        if isinstance(tree, list) else ()
    for key, value in items:
        out.append((*prefix, key))
        out.extend(_paths(value, (*prefix, key)))
    return out


def _mutate_tree(tree, rng: random.Random) -> str:
    """Delete a random key, or change a random value's type; returns what changed."""
    paths = _paths(tree)
    if not paths:
        return "nothing to change"
    path = rng.choice(paths)
    parent = tree
    for key in path[:-1]:
        parent = parent[key]
    if isinstance(parent, dict) and rng.random() < 0.4:
        del parent[path[-1]]
        return f"deleted {'.'.join(map(str, path))}"
    value = rng.choice(ODD_VALUES)
    parent[path[-1]] = value
    return f"{'.'.join(map(str, path))} = {value!r}"


def _edit_json(path: Path, rng: random.Random) -> str:
    tree = json.loads(path.read_text())
    what = _mutate_tree(tree, rng)
    path.write_text(json.dumps(tree))
    return f"{path.name}: {what}"


def _safetensors_header(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def _edit_header(path: Path, rng: random.Random) -> str:
    """Break one field of the safetensors header (dtype, shape, offsets, metadata)."""
    header, body = _safetensors_header(path)
    what = _mutate_tree(header, rng)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)
    return f"{path.name} header: {what}"


def _drop_or_reshape(path: Path, rng: random.Random) -> str:
    from safetensors.torch import load_file, save_file

    state = load_file(path)
    name = rng.choice(sorted(state))
    if rng.random() < 0.5 or state[name].dim() == 0 or state[name].shape[-1] < 2:
        del state[name]
        what = f"dropped {name}"
    else:
        state[name] = state[name][..., : state[name].shape[-1] // 2].contiguous()
        what = f"halved the last dimension of {name}"
    save_file(state, path, metadata={"format": "pt"})
    return f"{path.name}: {what}"


def _checkpoint_corruption(directory: Path, rng: random.Random) -> str:
    config, weights = directory / "config.json", directory / "model.safetensors"
    header_bytes = 8 + struct.unpack("<Q", weights.read_bytes()[:8])[0]
    choices: list[Callable[[], str]] = [
        lambda: _truncate(config, rng),
        lambda: _flip(config, rng),
        lambda: _edit_json(config, rng),
        lambda: _edit_json(config, rng),
        lambda: _truncate(weights, rng),
        lambda: _flip(weights, rng, head=header_bytes),
        lambda: _flip(weights, rng),
        lambda: _edit_header(weights, rng),
        lambda: _drop_or_reshape(weights, rng),
    ]
    return rng.choice(choices)()


def _gguf_value_flip(path: Path, rng: random.Random) -> str:
    """Flip a byte inside one metadata value or tensor-table entry, the layout kept: these
    reach past the header walk into transformers' GGUF loader."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    fields = [*reader.fields.values(), *(t.field for t in reader.tensors)]
    field = rng.choice([f for f in fields if f.data])
    index = rng.choice(field.data)
    start = field.offset + sum(part.nbytes for part in field.parts[:index])
    spot = start + rng.randrange(max(1, field.parts[index].nbytes))
    del reader
    data = bytearray(path.read_bytes())
    data[spot] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    return f"{path.name}: a bit of {field.name} flipped (byte {spot})"


def _gguf_corruption(path: Path, rng: random.Random) -> str:
    from gguf import GGUFReader

    kind = rng.random()
    if kind < 0.25:
        return _truncate(path, rng)
    if kind < 0.6:
        return _gguf_value_flip(path, rng)
    start = GGUFReader(str(path)).data_offset if rng.random() < 0.7 else None
    return _flip(path, rng, head=start)


def _recipe_corruption(path: Path, rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.2:
        return _truncate(path, rng)
    if kind < 0.4:
        return _flip(path, rng)
    tree = yaml.safe_load(path.read_text())
    what = _mutate_tree(tree, rng)
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return f"{path.name}: {what}"


# -- the runs ------------------------------------------------------------------------------

def _outcome(run: Callable[[], object]) -> str | None:
    """``None`` when ``run`` loads or refuses in one line; else what went wrong."""
    try:
        run()
    except SnapPruneError as exc:
        message = str(exc)
        if not message or "\n" in message:
            return f"SnapPruneError not one line: {message!r}"
    except Exception as exc:  # the failures this test exists to find
        return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    return None


def _fuzz(count: int, source: Path, tmp_path: Path, corrupt, run, seed: int) -> list[str]:
    rng = random.Random(seed)
    failures = []
    for case in range(count):
        target = tmp_path / f"case{case}"
        if source.is_dir():
            shutil.copytree(source, target)
            what = corrupt(target, rng)
            problem = _outcome(lambda t=target: run(t))
        else:
            target.mkdir()
            copy = target / source.name
            shutil.copy(source, copy)
            what = corrupt(copy, rng)
            problem = _outcome(lambda c=copy: run(c))
        if problem is not None:
            failures.append(f"case {case} ({what}): {problem}")
        shutil.rmtree(target)
    return failures


def _load(path: Path) -> None:
    load_model(str(path), progress=False)


def test_fuzzed_checkpoints_load_or_refuse_in_one_line(micro, tmp_path):
    started = time.perf_counter()
    failures = _fuzz(CHECKPOINT_CASES, micro, tmp_path, _checkpoint_corruption, _load, SEED)
    seconds = time.perf_counter() - started
    assert not failures, "\n".join(failures)
    assert seconds < BUDGET_SECONDS * 0.3, f"{CHECKPOINT_CASES} cases took {seconds:.1f} s"


def test_fuzzed_checkpoints_through_the_cli_exit_2_in_one_line_and_write_nothing(
        micro, tmp_path, capsys):
    """The whole command on corrupted checkpoints: rc 0 (a harmless corruption) or rc 2 with
    one ``snapprune: error:`` line, no traceback, and no output or partial output left."""
    rng = random.Random(SEED + 3)
    failures, refused = [], 0
    started = time.perf_counter()
    for case in range(CLI_CASES):
        target, out = tmp_path / f"case{case}", tmp_path / f"out{case}"
        shutil.copytree(micro, target)
        what = _checkpoint_corruption(target, rng)
        try:
            code = main(["prune", "--model", str(target), "--method", "magnitude",
                         "--sparsity", "0.5", "--out", str(out), "--quiet", "--no-eval",
                         "--no-samples"])
        except BaseException as exc:
            failures.append(f"case {case} ({what}): raised {type(exc).__name__}: {exc}")
            continue
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        if code == 2:
            refused += 1
            if len(lines) != 1 or not lines[0].startswith("snapprune: error:") or \
                    "Traceback" in err:
                failures.append(f"case {case} ({what}): not one line: {err!r}")
            if out.exists() or list(tmp_path.glob(f".out{case}*")):
                failures.append(f"case {case} ({what}): refused but wrote {out}")
        elif code != 0:
            failures.append(f"case {case} ({what}): exit {code}: {err[-300:]!r}")
        shutil.rmtree(target)
    seconds = time.perf_counter() - started
    assert not failures, "\n".join(failures)
    assert refused > CLI_CASES // 3  # most corruptions are refused: the test tests refusals
    assert seconds < BUDGET_SECONDS * 0.25, f"{CLI_CASES} runs took {seconds:.1f} s"


def test_fuzzed_gguf_files_load_or_refuse_in_one_line(micro_gguf, tmp_path):
    started = time.perf_counter()
    failures = _fuzz(GGUF_CASES, micro_gguf, tmp_path, _gguf_corruption, _load, SEED + 1)
    seconds = time.perf_counter() - started
    assert not failures, "\n".join(failures)
    assert seconds < BUDGET_SECONDS * 0.35, f"{GGUF_CASES} cases took {seconds:.1f} s"


@pytest.fixture
def recipe_file(micro, tmp_path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.replace("MODEL", str(micro)))
    return path


def test_fuzzed_recipes_read_or_refuse_in_one_line(recipe_file, tmp_path):
    assert read_recipe(recipe_file).model  # the uncorrupted recipe reads
    started = time.perf_counter()
    rng = random.Random(SEED + 2)
    failures = []
    for case in range(RECIPE_CASES):
        path = tmp_path / f"case{case}.yaml"
        shutil.copy(recipe_file, path)
        what = _recipe_corruption(path, rng)
        problem = _outcome(lambda p=path: read_recipe(p))
        if problem is not None:
            failures.append(f"case {case} ({what}): {problem}")
    seconds = time.perf_counter() - started
    assert not failures, "\n".join(failures)
    assert seconds < BUDGET_SECONDS * 0.1, f"{RECIPE_CASES} cases took {seconds:.1f} s"
