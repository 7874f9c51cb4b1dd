"""Read a running console's status document over HTTP (what `mesh-node status` uses).

Synchronous and stdlib-only on purpose: it runs once from the command line, not on a
node's event loop. Environment proxies are ignored (a console is on this machine or the
LAN).
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from typing import Any

MAX_DOCUMENT_BYTES = 64 << 20


class ConsoleError(Exception):
    """The console could not be read; the message is one line that says what to do."""


def fetch_status(console_url: str, timeout: float = 5.0) -> dict[str, Any]:
    """GET `<console_url>/api/status`, checked to be a status document (proto/CONSOLE.md)."""
    base = console_url.rstrip("/")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(f"{base}/api/status", headers={"Accept": "application/json"})
    try:
        with opener.open(request, timeout=timeout) as response:
            body = response.read(MAX_DOCUMENT_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise ConsoleError(
            f"the console at {base} answered HTTP {exc.code}: {_one_line(_error_text(exc))}"
        ) from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, ConnectionRefusedError):
            reason = "connection refused, nothing listens there"
        reason = _one_line(str(reason))
        raise ConsoleError(
            f"cannot reach the console at {base} ({reason}); is a node running there? "
            "Start one with `mesh-node join`, or point --console at one"
        ) from None
    except TimeoutError:
        raise ConsoleError(f"the console at {base} did not answer within {timeout}s") from None
    except (http.client.HTTPException, OSError) as exc:
        raise ConsoleError(
            f"the console at {base} did not answer HTTP properly "
            f"({type(exc).__name__}: {_one_line(str(exc))}); "
            "is that address a mesh-node console?"
        ) from None
    if len(body) > MAX_DOCUMENT_BYTES:
        raise ConsoleError(f"the console at {base} answered more than {MAX_DOCUMENT_BYTES} bytes")
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ConsoleError(
            f"the console at {base} did not answer JSON; is that address a mesh-node console?"
        ) from None
    problem = status_document_problem(document)
    if problem:
        raise ConsoleError(f"the console at {base} answered a malformed status document: {problem}")
    return document


def status_document_problem(document: Any) -> str | None:
    """What makes `document` unusable as a status document, or None. Only the fields the
    renderers rely on are checked; everything else is shown as found."""
    if not isinstance(document, dict):
        return f"expected a JSON object, got {type(document).__name__}"
    if not isinstance(document.get("node"), str):
        return "'node' is missing or not a string"
    peers = document.get("peers")
    if not isinstance(peers, list):
        return "'peers' is missing or not a list"
    for index, peer in enumerate(peers):
        if not isinstance(peer, dict) or not isinstance(peer.get("id"), str):
            return f"peers[{index}] is not an object with a string 'id'"
    models = document.get("models", [])
    if not isinstance(models, list) or not all(
        isinstance(m, dict) and isinstance(m.get("name"), str) for m in models
    ):
        return "'models' is not a list of objects with a string 'name'"
    return None


def _error_text(exc: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(exc.read(64 << 10))
        error = body["error"]
        return str(error["message"] if isinstance(error, dict) else error)  # (OpenAI's shape)
    except Exception:
        return exc.reason or "no details"


def _one_line(text: str, limit: int = 200) -> str:
    """Untrusted text squeezed onto one line (the message must stay one line)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
