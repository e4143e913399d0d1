"""Network checks that answer fast, so a run without network falls back at once instead of retrying for minutes."""

from __future__ import annotations

import os
import socket
import sys
import threading
import urllib.error
import urllib.request
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0
_TRUE = {"1", "ON", "YES", "TRUE"}


def hub_reachable(endpoint: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether an HTTP request to ``endpoint`` gets any answer within ``timeout_s`` seconds.

    ``datasets`` and ``huggingface_hub`` retry an unreachable server with exponential backoff for about 25 s before
    failing; this answers in at most ``timeout_s``. It runs in a daemon thread because DNS resolution ignores
    socket timeouts. The request goes through ``urllib``, so ``HTTPS_PROXY`` and friends are honoured.
    """
    answer: list[bool] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout_s)
            answer.append(True)
        except urllib.error.HTTPError:
            answer.append(True)  # the server answered, with an error status: reachable
        except Exception:  # noqa: BLE001 - any network failure means unreachable
            answer.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s + 0.5)
    return bool(answer and answer[0])


def hf_offline_mode() -> bool:
    """Whether Hugging Face offline mode is on: ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` in the environment
    (read now, not at import time), or the flag as ``huggingface_hub`` and a loaded ``datasets`` hold it."""
    flags = [os.environ.get(name, "").strip().upper() in _TRUE for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")]
    try:
        import huggingface_hub

        flags.append(bool(huggingface_hub.constants.HF_HUB_OFFLINE))
    except ImportError:
        pass
    if "datasets" in sys.modules:  # its own copy of the flag, which code may switch at run time
        flags.append(bool(sys.modules["datasets"].config.HF_HUB_OFFLINE))
    return any(flags)


def tcp_reachable(url: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``url``'s host and port (443 by default) opens within ``timeout_s`` seconds.

    For servers whose own client opens the connection (W&B): only whether something listens matters.
    """
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout_s):
            return True
    except OSError:
        return False
