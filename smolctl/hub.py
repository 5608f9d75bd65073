"""Talking to the Hugging Face hub: fail in seconds, with one line, when it can't be reached.

Left alone, `datasets` and `transformers` retry an unreachable hub for 25-50 s before failing.
`require_hub(what, hint)` checks reachability with one short TCP connect first.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

from smolctl.errors import SmolctlError
from smolctl.fsutil import no_file


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


# Endings that make a name a file, never a hub repo (hub ids such as Qwen/Qwen2.5-0.5B have dots too).
FILE_SUFFIXES = {".jsonl", ".json", ".parquet", ".txt", ".csv", ".arrow", ".gguf", ".safetensors", ".bin", ".pt",
                 ".pth", ".yaml", ".yml", ".toml", ".whl", ".zip", ".gz", ".zst", ".log"}


def looks_local(spec: str) -> bool:
    """Whether `spec` names something on this machine rather than a hub repo: it exists (if only as
    a dangling link), or it has a sign of a path -- a leading . / or ~, a backslash, more than one
    /, glob characters, a file ending, or a first part that is a local directory (`runs/typo`)."""
    path = os.path.expanduser(spec)
    first, _, rest = spec.partition("/")
    return (os.path.lexists(path) or spec.startswith((".", "/", "~")) or "\\" in spec or "/" in rest
            or any(c in spec for c in "*?[") or os.path.splitext(spec)[1].lower() in FILE_SUFFIXES
            or bool(rest and os.path.isdir(first)))


def looks_like_hub_id(spec: str) -> bool:
    """'owner/name' with no sign of a local path (see looks_local)."""
    return spec.count("/") == 1 and all(spec.split("/")) and not looks_local(spec)


def no_local_match(spec: str, what: str) -> str:
    """'… no such file or directory' for a local-looking `spec`, naming near misses next to it."""
    import difflib

    path = os.path.expanduser(spec)
    parent = os.path.dirname(path) or "."
    if os.path.lexists(path) and not os.path.isfile(path) and not os.path.isdir(path):
        return no_file(what, spec)  # something else is there: a device, a named pipe, a dangling link
    if any(c in spec for c in "*?["):
        return f"{what} {spec}: no local file matches this pattern"
    if not os.path.isdir(parent):
        return f"{what} {spec}: no such file or directory ({parent} does not exist)"
    near = difflib.get_close_matches(os.path.basename(path), os.listdir(parent), n=3)
    return f"{what} {spec}: no such file or directory" + (
        f" (did you mean {', '.join(os.path.join(os.path.dirname(spec), n) for n in near)}?)" if near else "")
