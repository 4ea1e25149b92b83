"""A GGUF file's header and tensor table walked before ``transformers`` reads it.

``transformers`` and gguf-py answer a truncated or corrupt GGUF with a numpy reshape error (or
build a model of absurd size from a corrupted count); here each is one line naming the fix.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from pathlib import Path
from typing import NamedTuple

from ..errors import SnapPruneError
from .checkpoint_files import one_line

_GGUF_MAGIC = b"GGUF"
_GGUF_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
"""GGUF metadata value types of fixed width (bytes); 8 is a string, 9 an array."""
_GGUF_SIZES = (".block_count", ".embedding_length", ".feed_forward_length", ".vocab_size",
               ".context_length", ".rope.dimension_count", ".attention.head_count",
               ".attention.head_count_kv", ".attention.key_length", ".attention.value_length",
               ".expert_count")
"""GGUF metadata that sizes the model transformers builds (and its real buffers)."""


class GGUFHeader(NamedTuple):
    """What the walk learns besides the file being whole: read here once, where gguf-py's
    reader would parse every tokenizer string in Python (seconds per read for a 49k vocabulary)."""

    tensors: int
    matrix_types: frozenset[int]
    """The ggml types of the tensors of two or more dimensions (the weights' storage)."""
    data_offset: int
    """Where the tensor data starts: every byte before it is metadata."""


def check_gguf(path: str | Path) -> GGUFHeader:
    """Walk a GGUF file's header and tensor table (no tensor data read) and refuse, in one line,
    a file that is truncated, corrupt or not GGUF."""
    from gguf import GGML_QUANT_SIZES

    path = Path(path)
    bad = f"{path} is truncated or corrupt"
    fix = "re-download or re-export it"
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size < 24:
                raise SnapPruneError(f"{bad}: {size} bytes, shorter than a GGUF header; {fix}")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as blob:
                if blob[:4] != _GGUF_MAGIC:
                    raise SnapPruneError(f"{path} is not a GGUF file (it does not start with "
                                         "the GGUF magic bytes); give a .gguf file written by "
                                         "llama.cpp or snapprune")
                return _walk_gguf(blob, size, GGML_QUANT_SIZES, bad, fix)
    except SnapPruneError:
        raise
    except OSError as exc:
        raise SnapPruneError(f"cannot read {path} ({exc.strerror or exc}); check the path and "
                             "its permissions") from None
    except Exception as exc:  # struct.error past the end, bad UTF-8, absurd counts
        raise SnapPruneError(f"{bad} ({one_line(exc)}); {fix}") from None


def _walk_gguf(blob, size: int, block_sizes, bad: str, fix: str) -> GGUFHeader:
    version, tensor_count, kv_count = struct.unpack_from("<IQQ", blob, 4)
    if version not in (2, 3):
        raise SnapPruneError(f"{bad}: GGUF version {version}, not 2 or 3; {fix}")
    if tensor_count == 0 or tensor_count > size // 24 or kv_count > size // 12:
        raise SnapPruneError(f"{bad}: its header counts {tensor_count} tensors and {kv_count} "
                             f"metadata keys in {size} bytes; {fix}")
    pos = 24

    def string(at: int) -> tuple[str, int]:
        (length,) = struct.unpack_from("<Q", blob, at)
        if at + 8 + length > size:
            raise SnapPruneError(f"{bad}: a string runs past the end of the file; {fix}")
        return bytes(blob[at + 8: at + 8 + length]).decode("utf-8"), at + 8 + length

    metadata: dict[str, object] = {}
    for _ in range(kv_count):
        key, pos = string(pos)
        (kind,) = struct.unpack_from("<I", blob, pos)
        pos += 4
        if kind in _GGUF_SCALARS:
            fmt = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}[_GGUF_SCALARS[kind]]
            (metadata[key],) = struct.unpack_from(fmt, blob, pos)
            pos += _GGUF_SCALARS[kind]
        elif kind == 8:
            metadata[key], pos = string(pos)
        elif kind == 9:
            item, count = struct.unpack_from("<IQ", blob, pos)
            pos += 12
            if item in _GGUF_SCALARS:
                pos += count * _GGUF_SCALARS[item]
            elif item == 8:
                for _ in range(count):
                    (length,) = struct.unpack_from("<Q", blob, pos)
                    pos += 8 + length
                    if pos > size:
                        break
            else:
                raise SnapPruneError(f"{bad}: metadata {key} is an array of type {item}; {fix}")
        else:
            raise SnapPruneError(f"{bad}: metadata {key} has value type {kind}; {fix}")
        if pos > size:
            raise SnapPruneError(f"{bad}: metadata {key} runs past the end of the file; {fix}")
    if not isinstance(metadata.get("general.architecture"), str):
        raise SnapPruneError(f"{bad}: it names no general.architecture; {fix}")
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment < 1:
        raise SnapPruneError(f"{bad}: general.alignment is {alignment!r}; {fix}")
    sizes = {k: v for k, v in metadata.items() if isinstance(v, int) and k.endswith(_GGUF_SIZES)}
    tensors = []
    matrix_types: set[int] = set()
    for _ in range(tensor_count):
        name, pos = string(pos)
        (dims,) = struct.unpack_from("<I", blob, pos)
        if dims > 4:
            raise SnapPruneError(f"{bad}: tensor {name} has {dims} dimensions; {fix}")
        shape = struct.unpack_from(f"<{dims}Q", blob, pos + 4)
        kind, offset = struct.unpack_from("<IQ", blob, pos + 4 + 8 * dims)
        pos += 4 + 8 * dims + 12
        if kind not in block_sizes:
            raise SnapPruneError(f"{bad}: tensor {name} has ggml type {kind}; {fix}")
        tensors.append((name, math.prod(shape), kind, offset))
        if dims > 1:
            matrix_types.add(kind)
    values = sum(count for _, count, _, _ in tensors)
    for key, value in sizes.items():  # a corrupted count would build a model for hours
        limit = len(tensors) if key.endswith(".block_count") else values
        if value > limit:
            raise SnapPruneError(f"{bad}: {key} is {value:,}, more than its {limit:,} "
                                 f"{'tensors' if key.endswith('.block_count') else 'values'}; "
                                 f"{fix}")
    start = (pos + alignment - 1) // alignment * alignment
    for name, count, kind, offset in tensors:
        block, block_bytes = block_sizes[kind]
        end = start + offset + count // block * block_bytes
        if count % block or end > size:
            raise SnapPruneError(f"{bad}: tensor {name} ends at byte {end:,} of a {size:,}-byte "
                                 f"file; {fix}")
    return GGUFHeader(len(tensors), frozenset(matrix_types), start)
