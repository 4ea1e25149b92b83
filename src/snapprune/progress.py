"""Progress bars drawn by other libraries follow ``--quiet`` too."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def third_party_bars(enabled: bool) -> Iterator[None]:
    """Silence every tqdm bar created inside this block (transformers' GGUF de-quantisation,
    lm-eval's loops) when ``enabled`` is false. tqdm reads its ``TQDM_*`` environment once at
    import, so the constructor itself is wrapped for the block and restored after it."""
    if enabled:
        yield
        return
    import tqdm.std

    original = tqdm.std.tqdm.__dict__["__init__"]

    def quiet_init(self, *args, **kwargs):
        kwargs["disable"] = True
        original.__get__(self, type(self))(*args, **kwargs)

    tqdm.std.tqdm.__init__ = quiet_init
    try:
        yield
    finally:
        tqdm.std.tqdm.__init__ = original
