"""Calibration windows and evaluation text: Hub datasets, samples bundled with the package,
local files, or the model itself.

Every named source is declared once in ``SOURCES``: what it is, whether it needs the Hub,
whether it serves calibration or evaluation, and (for calibration) its default window count
and length. Calibration follows the published protocol (SparseGPT/Wanda): draw random
documents longer than the window and take a random window from each, seeded, so the same seed
gives the same tokens.
"""

from __future__ import annotations

import gzip
import json
import random
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from .errors import SnapPruneError
from .hub import require_hub, unreachable_reason

C4_REPO = "allenai/c4"
C4_TRAIN_FILE = "en/c4-train.00000-of-01024.json.gz"
C4_VALIDATION_FILE = "en/c4-validation.00000-of-00008.json.gz"
JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
SAMPLES = "snapprune.samples"


@dataclass(frozen=True)
class Source:
    """A named text source. ``nsamples``/``seqlen``: the calibration windows it gives when the
    user names no count or length (``None``: not a calibration source)."""

    name: str
    summary: str
    hub: bool = False
    calibration: bool = False
    evaluation: bool = False
    nsamples: int | None = None
    seqlen: int | None = None
    sample_file: str | None = None
    """The bundled file (package data under ``snapprune/samples``) it reads."""


PAPER_WINDOWS = (128, 2048)
"""The published calibration protocol: 128 windows of 2,048 tokens."""
SAMPLE_WINDOWS = (32, 512)
"""The bundled sample's default: enough for a useful first run in minutes on a CPU."""

SOURCES = {s.name: s for s in (
    Source("c4", "C4 en (Hub): train shard 0 for calibration, validation shard 0 for "
           "evaluation", hub=True, calibration=True, evaluation=True,
           nsamples=PAPER_WINDOWS[0], seqlen=PAPER_WINDOWS[1]),
    Source("wikitext2", "WikiText-2 raw (Hub): train split for calibration, test for "
           "evaluation", hub=True, calibration=True, evaluation=True,
           nsamples=PAPER_WINDOWS[0], seqlen=PAPER_WINDOWS[1]),
    Source("ptb", "Penn Treebank (Hub): test sentences", hub=True, evaluation=True),
    Source("self", "text sampled from the model itself (no data; slow)", calibration=True,
           nsamples=PAPER_WINDOWS[0], seqlen=PAPER_WINDOWS[1]),
    Source("c4-sample", "bundled: 319 C4 en validation documents of 2,000+ characters",
           calibration=True, nsamples=SAMPLE_WINDOWS[0], seqlen=SAMPLE_WINDOWS[1],
           sample_file="c4-calibration.jsonl.gz"),
    Source("c4-sample-eval", "bundled: 500 other C4 en validation documents (the C4 tail)",
           evaluation=True, sample_file="c4-evaluation.jsonl.gz"),
    Source("wikitext2-test", "bundled: the WikiText-2 raw test split", evaluation=True,
           sample_file="wikitext-2-test.raw.gz"),
)}
CALIBRATION_SOURCES = tuple(n for n, s in SOURCES.items() if s.calibration)
EVALUATION_SOURCES = tuple(n for n, s in SOURCES.items() if s.evaluation)
AUTO = "auto"
"""Calibration source when none is named: ``c4`` with the Hub, else ``c4-sample``."""
DEFAULT_EVALUATION = "wikitext2-test"


def sample_path(name: str) -> Path:
    """The path of a bundled sample file (package data)."""
    path = Path(str(resources.files(SAMPLES).joinpath(name)))
    if not path.is_file():
        raise SnapPruneError(f"bundled sample {name} is missing from the installed package; "
                             "reinstall snapprune")
    return path


def resolve_calibration_source(source: str) -> tuple[str, str | None]:
    """``(source, note)``: ``auto`` becomes ``c4`` when the Hub answers and the bundled
    ``c4-sample`` when it does not (``note`` says so in one line)."""
    if source != AUTO:
        return source, None
    reason = unreachable_reason()
    if reason is None:
        return "c4", None
    return "c4-sample", (f"calibration: the Hub is not reachable ({reason}), so the bundled C4 "
                         "sample is used (--calib c4-sample; --calib FILE for your own text)")


def default_windows(source: str) -> tuple[int, int]:
    """``(nsamples, seqlen)`` when the user names none: the source's own, or the paper's."""
    named = SOURCES.get(source)
    if named is not None and named.nsamples:
        return named.nsamples, named.seqlen
    return PAPER_WINDOWS


def check_source(source: str, *, calibration: bool) -> None:
    """A named source must serve the purpose and be reachable (the Hub, asked once, in
    seconds); a path must exist."""
    what = "calibration source" if calibration else "evaluation source"
    names = CALIBRATION_SOURCES if calibration else EVALUATION_SOURCES
    named = SOURCES.get(source)
    if named is not None:
        if not (named.calibration if calibration else named.evaluation):
            raise SnapPruneError(f"{source} is not {'a' if calibration else 'an'} {what}; "
                                 f"use one of {', '.join(names)} or a local file")
        if named.hub:
            require_hub(f"{what} {source!r}", LOCAL_FIX)
        return
    if source == AUTO and calibration:
        return
    if not _exists(Path(source), what):
        raise SnapPruneError(
            f"{what} {source!r} not found: use {', '.join(names)} or a path to an existing file"
        )
    if Path(source).is_dir():
        raise SnapPruneError(_directory_refusal(what, source))


def _exists(path: Path, what: str) -> bool:
    """``path.exists()``, with a one-line refusal where the lookup itself fails (a name too
    long for the file system, a parent that cannot be searched)."""
    try:
        return path.exists()
    except OSError as exc:
        shown = str(path) if len(str(path)) <= 60 else str(path)[:57] + "..."
        raise SnapPruneError(f"{what} {shown!r} cannot be looked up ({exc.strerror or exc}); "
                             "give a shorter path to an existing file") from None


def _directory_refusal(what: str, source: str | Path) -> str:
    return (f"{what} {source} is a directory; give one file in it (.txt, .jsonl or .json.gz "
            "with a 'text' field)")


def _is_json(path: Path) -> bool:
    return path.name.endswith(JSON_SUFFIXES)


def read_documents(path: str | Path) -> list[str]:
    """Documents of a local file: one per ``text`` field (JSON lines, gzipped or not), or the
    whole file for plain text."""
    path = Path(path)
    if _exists(path, "file") and path.is_dir():
        raise SnapPruneError(_directory_refusal("text source", path))
    if not path.is_file():
        raise SnapPruneError(f"file {path} not found; check the path")
    try:
        if _is_json(path):
            opener = gzip.open if path.name.endswith(".gz") else open
            docs = []
            with opener(path, "rt", encoding="utf-8") as handle:
                for number, line in enumerate(handle, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as exc:  # its own line number is always 1
                        raise SnapPruneError(
                            f"{path}:{number} is not valid JSON ({exc.msg} at column "
                            f"{exc.colno}); JSON lines need one {{\"text\": \"...\"}} object "
                            "per line: fix or remove that line"
                        ) from None
                    except RecursionError:
                        raise SnapPruneError(f"{path}:{number} nests too deeply to read; JSON "
                                             'lines need one {"text": "..."} object per '
                                             "line") from None
                    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                        raise SnapPruneError(
                            f"{path}:{number} has no 'text' field; JSON lines need "
                            '{"text": "..."} per line'
                        )
                    docs.append(record["text"])
            return docs
        if path.name.endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8", newline="") as handle:
                return [handle.read().replace("\r\n", "\n")]
        return [path.read_text(encoding="utf-8").replace("\r\n", "\n")]
    except UnicodeDecodeError as exc:
        raise SnapPruneError(f"cannot read {path}: it is not UTF-8 text ({exc.reason} at byte "
                             f"{exc.start}); save it as UTF-8") from exc
    except (OSError, EOFError, zlib.error) as exc:  # gzip: truncated or not gzip at all
        raise SnapPruneError(f"cannot read {path} ({' '.join(str(exc).split())}); check that "
                             "the file is complete (a .gz file must be gzip)") from exc


def _local_documents(source: str, what: str, named: str) -> tuple[Path, list[str]]:
    path = Path(source)
    if not _exists(path, what):
        raise SnapPruneError(
            f"{what} {source!r} not found: use {named}, or a path to a .txt, .jsonl or "
            ".json.gz file"
        )
    return path, read_documents(path)


def wikitext_join(text: str) -> str:
    """WikiText as the published protocol sees it: rows (each keeping its newline) joined by a
    blank line. Works on the Hub's rows and on raw files whose blank lines were dropped."""
    lines = [line for line in text.replace("\r\n", "\n").split("\n") if line.strip()]
    return "\n\n".join(line + "\n" for line in lines)


LOCAL_FIX = ("use the bundled samples (c4-sample for calibration, wikitext2-test or "
             "c4-sample-eval for evaluation) or a local file (.txt, .jsonl or .json.gz with a "
             "'text' field)")


def _hub_file(repo: str, filename: str) -> str:
    from huggingface_hub import hf_hub_download

    require_hub(f"{repo}/{filename}", LOCAL_FIX)
    try:
        return hf_hub_download(repo, filename, repo_type="dataset")
    except Exception as exc:  # network, auth, missing file: one line for the user
        raise SnapPruneError(
            f"cannot download {repo}/{filename} from the Hub ({type(exc).__name__}); "
            "pass a local file instead (.txt, .jsonl or .json.gz with a 'text' field)"
        ) from exc


def _hub_rows(name: str, config: str | None, split: str, field: str) -> list[str]:
    require_hub(f"the {name} dataset ({split})", LOCAL_FIX)
    try:
        from datasets import load_dataset

        return list(load_dataset(name, config, split=split)[field])
    except Exception as exc:
        raise SnapPruneError(
            f"cannot load {name} ({split}) from the Hub ({type(exc).__name__}); pass a local "
            "file instead"
        ) from exc


PRETOKENIZE_CHARS = 8_000_000
"""Document sources up to this size (the bundled sample: 1.6 M characters) are tokenized whole
before any window is drawn (about a second), so that a request they cannot serve is refused
exactly and at once; a larger source is tokenized as its documents are drawn."""


def _token_bound(chars: int) -> int:
    """More tokens than a tokenizer makes of ``chars`` characters (at most 4 UTF-8 bytes each,
    rarely more than one token a byte, plus added special tokens): a bound that refuses an
    impossible request before anything is tokenized."""
    return 4 * chars + 8


def _too_little(source: str, nsamples: int, seqlen: int, holds: str) -> SnapPruneError:
    return SnapPruneError(f"{source} has too little text for {nsamples:,} windows of {seqlen} "
                          f"tokens: {holds}; lower nsamples or seqlen, or use more text")


def _windows_from_documents(
    docs: list[str], tokenizer, nsamples: int, seqlen: int, seed: int, source: str
) -> torch.Tensor:
    """Random documents longer than the window, a random window of each (with replacement).

    More windows than the documents hold (distinct start positions) are refused before any is
    drawn: at once by ``_token_bound``, exactly once every document is tokenized. Without this a
    request of 10**8 windows spun for hours tokenizing the same documents again and again."""
    bound = sum(max(0, _token_bound(len(d)) - seqlen) for d in docs)
    if nsamples > bound:
        raise _too_little(source, nsamples, seqlen,
                          f"its {len(docs):,} documents ({sum(map(len, docs)):,} characters) "
                          f"hold at most about {bound:,}")
    ids: dict[int, torch.Tensor] = {}
    if sum(map(len, docs)) <= PRETOKENIZE_CHARS:
        for i, row in enumerate(tokenizer(docs).input_ids):
            ids[i] = torch.tensor(row, dtype=torch.long)
    rng = random.Random(seed)
    windows = []
    checked = False
    while len(windows) < nsamples:
        if not checked and len(ids) == len(docs):
            _check_documents(ids, nsamples, seqlen, source)
            checked = True
        i = rng.randint(0, len(docs) - 1)
        if i not in ids:
            ids[i] = tokenizer(docs[i], return_tensors="pt").input_ids[0]
        doc = ids[i]
        if doc.numel() <= seqlen:
            continue
        start = rng.randint(0, doc.numel() - seqlen - 1)
        windows.append(doc[start : start + seqlen])
    return torch.stack(windows)


def _check_documents(ids: dict[int, torch.Tensor], nsamples: int, seqlen: int,
                     source: str) -> None:
    lengths = [t.numel() for t in ids.values()]
    usable = [n for n in lengths if n > seqlen]
    if not usable:
        raise SnapPruneError(
            f"{source} has too little text: no document is longer than {seqlen} tokens "
            f"(longest: {max(lengths, default=0)}); lower seqlen or use a source with longer "
            "documents"
        )
    distinct = sum(n - seqlen for n in usable)
    if nsamples > distinct:
        raise _too_little(source, nsamples, seqlen,
                          f"its {len(usable):,} documents longer than {seqlen} tokens hold "
                          f"{distinct:,} distinct windows")


def _check_stream_bound(text: str, nsamples: int, seqlen: int, source: str) -> None:
    """Refuse before tokenizing a text that could not hold the windows however it tokenizes."""
    if nsamples * seqlen > _token_bound(len(text)):
        raise _too_little(source, nsamples, seqlen,
                          f"its {len(text):,} characters make at most about "
                          f"{_token_bound(len(text)):,} tokens")


def _windows_from_stream(
    ids: torch.Tensor, nsamples: int, seqlen: int, seed: int, source: str
) -> torch.Tensor:
    """Random windows of one long token stream (WikiText, plain text files)."""
    if ids.numel() < nsamples * seqlen or ids.numel() <= seqlen:
        raise SnapPruneError(
            f"{source} has too little text: {ids.numel()} tokens for {nsamples} windows of "
            f"{seqlen}; lower nsamples or seqlen, or use more text"
        )
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[s : s + seqlen] for s in starts])


def calibration_windows(
    source: str,
    tokenizer,
    *,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    model=None,
) -> torch.Tensor:
    """``nsamples × seqlen`` token ids for calibration.

    ``source``: ``c4`` (Hub shard 0 of C4 en train), ``wikitext2`` (Hub train split), ``self``
    (text sampled from ``model``), or a local ``.txt``/``.raw`` file or ``.jsonl``/``.json.gz``
    file of ``{"text": ...}`` documents.
    """
    if nsamples < 1 or seqlen < 2:
        raise SnapPruneError("calibration needs nsamples >= 1 and seqlen >= 2")
    if source == "self":
        if model is None:
            raise SnapPruneError("calibration source 'self' needs the model")
        return self_generated_windows(model, tokenizer, nsamples, seqlen, seed)
    if source == "c4":
        docs = read_documents(_hub_file(C4_REPO, C4_TRAIN_FILE))
        return _windows_from_documents(docs, tokenizer, nsamples, seqlen, seed, "C4")
    if source == "wikitext2":
        text = " ".join(_hub_rows("wikitext", "wikitext-2-raw-v1", "train", "text"))
        _check_stream_bound(text, nsamples, seqlen, "WikiText-2 train")
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
        return _windows_from_stream(ids, nsamples, seqlen, seed, "WikiText-2 train")
    named = SOURCES.get(source)
    if named is not None and named.sample_file is not None and named.calibration:
        docs = read_documents(sample_path(named.sample_file))
        return _windows_from_documents(docs, tokenizer, nsamples, seqlen, seed, source)
    if named is not None or source == AUTO:
        raise SnapPruneError(f"{source} is not a calibration source; use one of "
                             f"{', '.join(CALIBRATION_SOURCES)} or a local file")
    path, docs = _local_documents(source, "calibration source", ", ".join(CALIBRATION_SOURCES))
    if _is_json(path):
        return _windows_from_documents(docs, tokenizer, nsamples, seqlen, seed, str(path))
    _check_stream_bound(docs[0], nsamples, seqlen, str(path))
    ids = tokenizer(docs[0], return_tensors="pt").input_ids[0]
    return _windows_from_stream(ids, nsamples, seqlen, seed, str(path))


@torch.no_grad()
def self_generated_windows(model, tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Windows sampled from the model itself (temperature 1, from a random first token), for
    when no calibration text is at hand."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    vocab = model.get_output_embeddings().weight.shape[0]
    special = set(tokenizer.all_special_ids)
    firsts = [t for t in torch.randint(0, vocab, (nsamples * 4,), generator=gen).tolist()
              if t not in special][:nsamples]
    ids = torch.tensor(firsts, device=device)[:, None]
    torch.manual_seed(seed)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=seqlen - 1,
        min_new_tokens=seqlen - 1,
        pad_token_id=tokenizer.pad_token_id,
    )
    return out[:, :seqlen].cpu()


def evaluation_ids(source: str, tokenizer) -> torch.Tensor:
    """One long stream of token ids for perplexity, by the published protocol per dataset.

    ``wikitext2``: the test split, rows joined by blank lines. ``c4``: the first 1,100 documents
    of the en validation shard 0, joined by spaces. ``ptb``: the test sentences joined by spaces.
    ``wikitext2-test`` (bundled) is joined as WikiText, ``c4-sample-eval`` (bundled) as JSON
    lines. A local file: WikiText-format ``wiki.*.raw`` joined as WikiText, other text files as
    they are, JSON lines' documents joined by blank lines.
    """
    if source == "wikitext2":
        text = "\n\n".join(_hub_rows("wikitext", "wikitext-2-raw-v1", "test", "text"))
    elif source == "c4":
        docs = read_documents(_hub_file(C4_REPO, C4_VALIDATION_FILE))[:1100]
        text = " ".join(docs)
    elif source == "ptb":
        text = " ".join(_hub_rows("ptb_text_only", "penn_treebank", "test", "sentence"))
    elif source == "wikitext2-test":
        text = wikitext_join(read_documents(sample_path(SOURCES[source].sample_file))[0])
    elif source == "c4-sample-eval":
        text = "\n\n".join(read_documents(sample_path(SOURCES[source].sample_file)))
    elif source in SOURCES:
        raise SnapPruneError(f"{source} is not an evaluation source; use one of "
                             f"{', '.join(EVALUATION_SOURCES)} or a local file")
    else:
        path, docs = _local_documents(source, "evaluation source", ", ".join(EVALUATION_SOURCES))
        if _is_json(path):
            text = "\n\n".join(docs)
        elif path.name.startswith("wiki."):
            text = wikitext_join(docs[0])
        else:
            text = docs[0]
    return tokenizer(text, return_tensors="pt").input_ids[0]


def iter_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None) -> Iterator[torch.Tensor]:
    """Non-overlapping windows of ``seqlen`` tokens; a trailing partial window is dropped."""
    count = ids.numel() // seqlen
    if max_windows is not None:
        count = min(count, max_windows)
    for i in range(count):
        yield ids[i * seqlen : (i + 1) * seqlen]
