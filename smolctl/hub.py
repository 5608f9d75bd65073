"""Talking to the Hugging Face hub: fail in seconds, with one line, when it can't be reached.

Left alone, `datasets` and `transformers` retry an unreachable hub for 25-50 s before failing.
`require_hub(what, hint)` checks reachability with one short TCP connect first.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

from smolctl.errors import SmolctlError


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_hub(what: str, hint: str) -> None:
    """Raise a one-line SmolctlError unless the hub answers."""
    if not hub_reachable():
        raise SmolctlError(f"cannot reach the Hugging Face hub for {what} (offline?)", hint=hint)


def looks_like_hub_id(spec: str) -> bool:
    """'org/name' with no local meaning: not an existing path, no path-like prefix."""
    return (spec.count("/") == 1 and not spec.startswith((".", "/", "~"))
            and not os.path.exists(spec) and all(spec.split("/")))
