"""Bad input models and bad data: one line naming the problem and the fix, exit code 2, no
traceback, no wrong result, nothing written. Each test failed before its fix ("Nothing lost,
round two")."""

from __future__ import annotations

import json
import shutil
import signal
import struct
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import C4_FILE
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from snapprune.cli import main

QUIET = ("--quiet", "--no-eval", "--no-samples")
WEIGHTS = "model.safetensors"


def _run(capsys, *argv) -> tuple[int, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    return code, capsys.readouterr().err


def _prune(capsys, model, out: Path, *extra) -> tuple[int, str]:
    return _run(capsys, "prune", "--model", model, "--method", "magnitude", "--sparsity", 0.5,
                "--out", out, *QUIET, *extra)


def _assert_refused(code: int, err: str, *fragments: str, out: Path | None = None) -> None:
    """Exit code 2, exactly one ``snapprune: error:`` line naming the problem, nothing written."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("snapprune: error:"), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    if out is not None:
        assert not out.exists()
        assert not list(out.parent.glob(f".{out.name}*"))  # no partial output either


def _copy(source: Path, tmp_path: Path, name: str = "model") -> Path:
    target = tmp_path / name
    shutil.copytree(source, target)
    return target


def _rewrite(directory: Path, change) -> None:
    state = load_file(directory / WEIGHTS)
    change(state)
    save_file(state, directory / WEIGHTS, metadata={"format": "pt"})


def _edit_config(directory: Path, **values) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(values)
    (directory / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def tiny_gguf(tiny_dir, tmp_path_factory) -> Path:
    """The tiny model as a GGUF file (q8_0), written by snapprune itself."""
    out = tmp_path_factory.mktemp("gguf") / "q8"
    code = main(["quantize", "--model", str(tiny_dir), "--method", "rtn", "--scheme", "q8_0",
                 "--format", "gguf", "--out", str(out), *QUIET])
    assert code == 0
    return out / "model.gguf"


# -- 1. a tensor missing from the checkpoint is refused, never filled with random values -----

def test_a_missing_tensor_is_refused_not_randomly_initialised(tiny_dir, tmp_path, capsys):
    model = _copy(tiny_dir, tmp_path)
    _rewrite(model, lambda state: state.pop("model.layers.0.mlp.down_proj.weight"))
    out = tmp_path / "out"
    code, err = _prune(capsys, model, out)
    _assert_refused(code, err, "model.layers.0.mlp.down_proj.weight", "random", out=out)


def test_a_missing_tensor_under_stream_is_refused_and_blocks_nothing(tiny_dir, tmp_path,
                                                                      capsys):
    """Streaming reads the shards itself: the same check, before any partial folder exists,
    so the next run into the same --out (with the fixed model) goes through."""
    model = _copy(tiny_dir, tmp_path)
    _rewrite(model, lambda state: state.pop("model.layers.1.self_attn.q_proj.weight"))
    out = tmp_path / "out"
    stream = ("--method", "wanda", "--calib", C4_FILE, "--nsamples", 2, "--seqlen", 16,
              "--stream")
    code, err = _prune(capsys, model, out, *stream)
    _assert_refused(code, err, "model.layers.1.self_attn.q_proj.weight", out=out)
    code, err = _prune(capsys, tiny_dir, out, *stream)
    assert code == 0, err
    assert (out / "snapprune_report.json").is_file() and list(out.glob("*.safetensors"))


def test_check_checkpoint_refuses_a_missing_expert_and_passes_fused_checkpoints(tmp_path):
    """Checkpoint keys are renamed as transformers renames them (experts fused on load)."""
    from tiny_models import tiny_moe_model

    from snapprune import SnapPruneError
    from snapprune.models.checkpoint_files import check_checkpoint

    model = tiny_moe_model("mixtral")
    model.save_pretrained(tmp_path / "moe")
    assert check_checkpoint(tmp_path / "moe").model_type == "mixtral"
    _rewrite(tmp_path / "moe",
             lambda state: state.pop("model.layers.0.block_sparse_moe.experts.2.w1.weight"))
    with pytest.raises(SnapPruneError, match=r"experts\.gate_up_proj"):
        check_checkpoint(tmp_path / "moe")


# -- 2. tracebacks that are now one line -----------------------------------------------------

def test_a_truncated_safetensors_file(tiny_dir, tmp_path, capsys):
    model = _copy(tiny_dir, tmp_path)
    data = (model / WEIGHTS).read_bytes()
    (model / WEIGHTS).write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    code, err = _prune(capsys, model, out)
    _assert_refused(code, err, WEIGHTS, "truncated", out=out)


@pytest.mark.parametrize("value", ["abc", [64]])
def test_a_config_value_of_the_wrong_type(tiny_dir, tmp_path, capsys, value):
    model = _copy(tiny_dir, tmp_path)
    _edit_config(model, hidden_size=value)
    out = tmp_path / "out"
    code, err = _prune(capsys, model, out)
    _assert_refused(code, err, "config.json", "hidden_size", out=out)


@pytest.mark.parametrize("index,fragment", [({"metadata": {}}, "no weight_map"),
                                            ("{not json", "not valid JSON")])
def test_a_broken_shard_index(tiny_dir, tmp_path, capsys, index, fragment):
    model = _copy(tiny_dir, tmp_path)
    (model / WEIGHTS).rename(model / "model-00001-of-00001.safetensors")
    text = index if isinstance(index, str) else json.dumps(index)
    (model / "model.safetensors.index.json").write_text(text)
    out = tmp_path / "out"
    code, err = _prune(capsys, model, out)
    _assert_refused(code, err, "model.safetensors.index.json", fragment, out=out)


def test_a_gguf_file_with_the_magic_and_garbage_after_it(tmp_path, capsys):
    garbage = tmp_path / "garbage.gguf"
    header = b"GGUF" + struct.pack("<IQQ", 3, 1, 1)  # version 3, one tensor, one key
    garbage.write_bytes(header + struct.pack("<Q", 2**40) + bytes(range(256)) * 8)
    code, err = _run(capsys, "eval", "--model", garbage, "--quiet", "--max-windows", 1)
    _assert_refused(code, err, str(garbage), "corrupt")


def test_a_truncated_gguf_file(tiny_gguf, tmp_path, capsys):
    data = tiny_gguf.read_bytes()
    for cut in (len(data) // 2, 3000):  # in the tensor data; in the metadata
        short = tmp_path / f"short{cut}.gguf"
        short.write_bytes(data[:cut])
        code, err = _run(capsys, "eval", "--model", short, "--quiet", "--max-windows", 1)
        _assert_refused(code, err, str(short), "truncated")


def test_a_tensor_of_the_wrong_shape(tiny_dir, tmp_path, capsys):
    model = _copy(tiny_dir, tmp_path)
    name = "model.layers.0.mlp.down_proj.weight"
    _rewrite(model, lambda state: state.update({name: state[name][:, :100].contiguous()}))
    out = tmp_path / "out"
    code, err = _prune(capsys, model, out)
    _assert_refused(code, err, name, "64×100", "64×128", out=out)


def test_a_config_that_describes_fewer_layers_than_the_weights(tiny_dir, tmp_path, capsys):
    model = _copy(tiny_dir, tmp_path)
    _edit_config(model, num_hidden_layers=2)  # loading dropped layer 2 without a word
    out = tmp_path / "out"
    code, err = _prune(capsys, model, out)
    _assert_refused(code, err, "model.layers.2.", "drop", out=out)


def test_a_model_name_too_long_for_the_file_system(tmp_path, capsys):
    out = tmp_path / "out"
    code, err = _prune(capsys, "x" * 300, out)
    _assert_refused(code, err, "too long", out=out)


# -- 3. messages that now name the problem and the fix ---------------------------------------

def test_a_model_directory_without_tokenizer_files(tiny_dir, tmp_path, capsys):
    model = _copy(tiny_dir, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model / name).unlink(missing_ok=True)
    out = tmp_path / "out"
    code, err = _prune(capsys, model, out)
    _assert_refused(code, err, "no tokenizer files", "save_pretrained", out=out)


def test_a_calibration_directory_is_named_a_directory(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = _run(capsys, "prune", "--model", tiny_dir, "--method", "wanda", "--sparsity",
                     0.5, "--calib", tmp_path, "--out", out, *QUIET)
    _assert_refused(code, err, "is a directory", out=out)


def test_a_broken_jsonl_line_is_reported_by_its_own_number(tiny_dir, tmp_path, capsys):
    calib = tmp_path / "calib.jsonl"
    calib.write_text('{"text": "a fine first line"}\n{broken\n')
    out = tmp_path / "out"
    code, err = _run(capsys, "prune", "--model", tiny_dir, "--method", "wanda", "--sparsity",
                     0.5, "--calib", calib, "--nsamples", 1, "--seqlen", 2, "--out", out,
                     *QUIET)
    _assert_refused(code, err, f"{calib}:2 ", out=out)
    code, err = _run(capsys, "eval", "--model", tiny_dir, "--eval", calib, "--quiet")
    _assert_refused(code, err, f"{calib}:2 ")


def test_a_mistyped_local_path_is_no_such_file_not_a_hub_id(tiny_dir, tmp_path, capsys,
                                                             monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    out = tmp_path / "out"
    for spec in ("./modle", str(tmp_path / "nothere"), "~/snapprune-no-such-model",
                 "runs/p24"):
        code, err = _prune(capsys, spec, out)
        _assert_refused(code, err, "no such directory or file", spec, out=out)
    shutil.copytree(tiny_dir, tmp_path / "runs" / "p24")
    code, err = _prune(capsys, "runs/p2", out)
    _assert_refused(code, err, "did you mean runs/p24", out=out)


# -- 4. an impossible window count is refused at once ----------------------------------------

@contextmanager
def _within(seconds: int):
    """Fail (not hang) when the block runs longer than ``seconds``."""
    def expire(_signum, _frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("calib", ["c4-sample", str(C4_FILE)])
def test_more_windows_than_the_source_holds_are_refused_at_once(tiny_dir, tmp_path, capsys,
                                                                calib):
    out = tmp_path / "out"
    with _within(60):
        code, err = _run(capsys, "prune", "--model", tiny_dir, "--method", "wanda",
                         "--sparsity", 0.5, "--calib", calib, "--nsamples", 100_000_000,
                         "--out", out, *QUIET)
    _assert_refused(code, err, "too little text", "100,000,000", "lower nsamples", out=out)


@pytest.mark.parametrize("source", ["text", "c4-sample"])
def test_an_impossible_window_count_is_refused_before_tokenizing(tmp_path, source):
    """A plain text file was tokenized whole (10 s for a large one) before the refusal."""
    from snapprune import SnapPruneError
    from snapprune.data import calibration_windows

    def never(*_args, **_kwargs):
        raise AssertionError("tokenized before refusing")

    if source == "text":
        source = str(tmp_path / "notes.txt")
        Path(source).write_text("a few words of text. " * 5000)
    with pytest.raises(SnapPruneError, match="too little text"):
        calibration_windows(source, never, nsamples=100_000_000, seqlen=256)


def test_the_exact_window_count_of_the_bundled_sample(tokenizer):
    from snapprune import SnapPruneError
    from snapprune.data import calibration_windows, read_documents

    lengths = [len(ids) for ids in tokenizer(read_documents(C4_FILE)).input_ids]
    distinct = sum(n - 256 for n in lengths if n > 256)
    with _within(60), pytest.raises(SnapPruneError, match=f"hold {distinct:,} distinct windows"):
        calibration_windows("c4-sample", tokenizer, nsamples=distinct + 1, seqlen=256)
    assert calibration_windows("c4-sample", tokenizer, nsamples=3, seqlen=256).shape == (3, 256)


# -- 5. a perplexity that overflows exp() is inf (null in JSON), never a crash ---------------

@pytest.fixture(scope="module")
def hot_dir(tiny_dir, tmp_path_factory) -> Path:
    """The tiny model with logits so large that the mean NLL is far above 709 nats."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    with torch.no_grad():
        model.lm_head.weight.mul_(1e5)
    out = tmp_path_factory.mktemp("hot") / "hot"
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(tiny_dir) / name, out / name)
    return out


def test_an_overflowing_perplexity_is_inf_after_pruning(hot_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = _run(capsys, "prune", "--model", hot_dir, "--method", "magnitude",
                     "--sparsity", 0.5, "--no-dense", "--eval-seqlen", 32, "--max-windows", 1,
                     "--out", out, "--quiet", "--no-samples")
    assert code == 0, err
    assert "Traceback" not in err
    report = json.loads((out / "snapprune_report.json").read_text())
    assert report["perplexity"]["wikitext2-test"]["perplexity"] is None  # inf: JSON null


def test_an_overflowing_perplexity_is_inf_in_eval(hot_dir, capsys):
    code = main(["eval", "--model", str(hot_dir), "--eval-seqlen", "32", "--max-windows", "1",
                 "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    payload = json.loads(captured.out)
    assert payload["perplexity"]["wikitext2-test"]["perplexity"] is None
