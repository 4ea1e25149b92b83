"""Is the Hugging Face Hub reachable? Asked once, answered in seconds, so that an offline
machine gets one clear line instead of the Hub client's retry loop."""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

from .errors import SnapPruneError

PROBE_SECONDS = 3.0


@functools.lru_cache(maxsize=1)
def unreachable_reason() -> str | None:
    """``None`` when the Hub answers a TCP connection; else why not (offline mode, DNS, …)."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return "offline mode is set (HF_HUB_OFFLINE)"
    url = urlparse(constants.ENDPOINT)
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=PROBE_SECONDS).close()
    except OSError as exc:
        return f"{host} is not reachable ({type(exc).__name__})"
    return None


def require_hub(what: str, fix: str) -> None:
    """Refuse at once, in one line, when ``what`` needs the Hub and it is not there."""
    reason = unreachable_reason()
    if reason is not None:
        raise SnapPruneError(f"{what} needs the Hugging Face Hub, but {reason}; {fix}")


def go_offline() -> None:
    """Make the Hub clients use their local cache only (no network attempts, no retries)."""
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
