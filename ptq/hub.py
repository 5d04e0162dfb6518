"""Whether the Hugging Face hub can be reached, decided once per process: offline, a hub model
or dataset then fails at once with a clear message, where the hub client would retry each
request for about 25 seconds, printing a warning per retry."""

from __future__ import annotations

from functools import lru_cache

PROBE_SECONDS = 5.0


@lru_cache(maxsize=1)
def unreachable() -> str | None:
    """None when the hub answers; else why it cannot be used (offline mode, or the probe's error)."""
    from huggingface_hub import constants, get_session  # lazily: importing ptq needs no network client

    if constants.is_offline_mode():
        return "offline mode is set (HF_HUB_OFFLINE)"
    try:  # one request, no retries: any HTTP answer, even an error status, means the hub is reachable
        get_session().head(constants.ENDPOINT, timeout=PROBE_SECONDS)
    except Exception as exc:  # whatever the transport raises: DNS, refused, timeout, proxy
        return f"{constants.ENDPOINT} is unreachable ({type(exc).__name__}: {exc})"
    return None
