"""Who may do what: the app and the HTTP API are private by default (loopback only); served to others, viewers
search and browse, and only an admin changes the lake.

Modes: ``private`` (the default while the app listens on loopback only: whoever reaches it is on this machine, and
may do everything) and ``shared`` (``IMGREC_MODE=shared``, or whenever the app listens beyond loopback): viewers
can search, browse and export results, but not change the lake folder, ingest a folder, add uploads to the lake or
make maps; the admin password (``IMGREC_ADMIN_PASSWORD``, or ``admin_password`` in Streamlit's secrets) unlocks
them for one session. Passwords and API keys are compared in constant time and never logged. No streamlit here.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from collections.abc import Mapping

MODE_ENV = "IMGREC_MODE"
PASSWORD_ENV = "IMGREC_ADMIN_PASSWORD"
API_KEY_ENV = "IMGREC_API_KEY"
MODES = ("private", "shared")

ADMIN_ACTIONS = {
    "lake": "change the lake folder",
    "ingest": "ingest a folder",
    "keep_uploads": "add uploads to the lake",
    "make_map": "make a map of the collection",
    "stop_ingest": "stop an ingestion",
    "join": "run a similarity join (a background job over the whole lake)",
}


class Forbidden(PermissionError):
    """An action this session may not take (a viewer in shared mode)."""


def is_loopback(address: str | None) -> bool:
    """Whether a listening address reaches this machine only. None or "" (every interface, Streamlit's own
    default) and "0.0.0.0" / "::" are not loopback; "localhost" is."""
    if not address:
        return False
    if address.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def mode(address: str | None, env: Mapping[str, str] | None = None) -> str:
    """``shared`` when asked for (``IMGREC_MODE=shared``) or when listening beyond loopback, else ``private``."""
    env = os.environ if env is None else env
    asked = (env.get(MODE_ENV) or "").strip().lower()
    if asked and asked not in MODES:
        raise ValueError(f"{MODE_ENV} must be one of {', '.join(MODES)} (got {asked!r})")
    return "shared" if asked == "shared" or not is_loopback(address) else "private"


def same_secret(given: str | None, expected: str | None) -> bool:
    """Whether ``given`` equals ``expected``, in time that depends on neither (both hashed first, so their lengths
    do not show either); False when no secret is set."""
    if not expected or given is None:
        hmac.compare_digest(b"0" * 32, b"1" * 32)  # the same work on every path
        return False
    a = hashlib.sha256(given.encode("utf-8", "surrogatepass")).digest()
    b = hashlib.sha256(expected.encode("utf-8", "surrogatepass")).digest()
    return hmac.compare_digest(a, b)


def describe(action: str) -> str:
    return ADMIN_ACTIONS.get(action, action)
