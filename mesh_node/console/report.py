"""The status document as `rich` tables for a terminal (`mesh-node status`).

Data from the mesh is never interpreted as rich markup (a node may call itself
"[red]x"): every cell is a `Text`.
"""

from __future__ import annotations

import time
from typing import IO, Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

STATUS_STYLES = {"alive": "bold green", "suspect": "bold yellow", "dead": "bold red", "left": "dim"}
GONE = frozenset({"dead", "left"})
KNOWN_KEYS = frozenset({"node", "mesh", "peers", "models"})
_WIDTH_WHEN_NOT_A_TERMINAL = 200


def terminal_console(file: IO[str]) -> Console:
    """A rich Console for `file`; output to a pipe or file is not wrapped at 80 columns."""
    width = None if file.isatty() else _WIDTH_WHEN_NOT_A_TERMINAL
    return Console(file=file, width=width, highlight=False)


def render_status(document: dict[str, Any], console: Console, now: float | None = None) -> None:
    """Print the summary line, the nodes table, the models table, and other keys' names."""
    now = time.time() if now is None else now
    document = _printable(document)  # peers' names reach this terminal: no escape sequences
    peers = sorted(document.get("peers", []), key=_peer_order)
    console.print(_summary(document, peers))
    console.print(nodes_table(peers, now))
    console.print(models_table(document.get("models", []), {p["id"]: p for p in peers}))
    others = sorted(k for k in document if k not in KNOWN_KEYS)
    if others:
        console.print(
            Text(
                f"Also in the status document: {', '.join(others)} (mesh-node status --json)",
                "dim",
            )
        )


def _printable(value: Any) -> Any:
    """`value` with every string's control characters (ESC, BEL, CR...) made visible."""
    if isinstance(value, str):
        if value.isprintable():
            return value
        return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in value)
    if isinstance(value, dict):
        return {_printable(k): _printable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_printable(v) for v in value]
    return value


def nodes_table(peers: list[dict[str, Any]], now: float) -> Table:
    table = Table(title="Nodes", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("node", no_wrap=True, min_width=10)
    table.add_column("status", no_wrap=True)
    table.add_column("role")
    table.add_column("hardware")
    table.add_column("load")
    table.add_column("last seen", no_wrap=True)
    table.add_column("rtt", justify="right", no_wrap=True)
    for peer in peers:
        status = str(peer.get("status", "?"))
        node = Text(_short(peer), "bold" if peer.get("self") else "")
        if peer.get("name"):
            node.append(f" {peer['name']}")
        if peer.get("self"):
            node.append(" (this node)", "dim")
        table.add_row(
            node,
            Text(status, STATUS_STYLES.get(status, "")),
            Text(str(peer.get("role", "?"))),
            Text(_hardware(peer.get("hardware"))),
            Text(_load(peer.get("load"))),
            Text(_last_seen(peer, now)),
            Text(_rtt(peer.get("rtt_ms"))),
            style="dim" if status in GONE else None,
        )
    if not peers:
        table.add_row(Text("no nodes known", "dim"), "", "", "", "", "", "")
    return table


def models_table(models: list[dict[str, Any]], peers: dict[str, dict[str, Any]]) -> Table:
    table = Table(title="Models", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("model", no_wrap=True)
    table.add_column("served by")
    table.add_column("on disk at")
    for model in models:
        served_by = model.get("served_by") or []
        table.add_row(
            Text(str(model.get("name"))),
            Text(
                _node_list(served_by, peers) if served_by else "nobody", "" if served_by else "dim"
            ),
            Text(_node_list(model.get("on_disk") or [], peers)),
        )
    if not models:
        table.add_row(Text("no models on any node yet", "dim"), "", "")
    return table


def _summary(document: dict[str, Any], peers: list[dict[str, Any]]) -> Text:
    counts = {s: sum(1 for p in peers if p.get("status") == s) for s in STATUS_STYLES}
    mesh = document.get("mesh") if isinstance(document.get("mesh"), dict) else {}
    text = Text("mesh: ")
    text.append(f"{mesh.get('nodes', len(peers))} nodes", "bold")
    for status, style in STATUS_STYLES.items():
        text.append(", ")
        text.append(f"{mesh.get(status, counts[status])} {status}", style)
    text.append(f"   this node: {str(document.get('node', '?'))[:10]}", "dim")
    return text


def _peer_order(peer: dict[str, Any]) -> tuple:
    return (
        not peer.get("self"),
        peer.get("status") in GONE,
        str(peer.get("name", "")),
        str(peer.get("id", "")),
    )


def _short(peer: dict[str, Any]) -> str:
    return str(peer.get("short") or str(peer.get("id", ""))[:10])


def _node_list(ids: Any, peers: dict[str, dict[str, Any]]) -> str:
    names = []
    for node_id in ids if isinstance(ids, list) else []:
        peer = peers.get(node_id) if isinstance(node_id, str) else None
        name = str(peer.get("name") or _short(peer)) if peer else str(node_id)[:10]
        names.append(
            f"{name} ({peer.get('status')})" if peer and peer.get("status") in GONE else name
        )
    return ", ".join(names)


def _gib(n: Any) -> str:
    return f"{n / (1 << 30):.1f}" if isinstance(n, int | float) else "?"


def _hardware(hardware: Any) -> str:
    if not isinstance(hardware, dict):
        return "not known yet"
    lines = [
        f"{hardware.get('cpu_cores', '?')} cores, RAM {_gib(hardware.get('ram_free'))}"
        f"/{_gib(hardware.get('ram_total'))} GiB free"
    ]
    gpus = hardware.get("gpus")
    for gpu in gpus if isinstance(gpus, list) else []:
        if not isinstance(gpu, dict):
            continue
        lines.append(
            f"{gpu.get('name', 'GPU')} {_gib(gpu.get('vram_free'))}"
            f"/{_gib(gpu.get('vram_total'))} GiB free"
        )
    return "\n".join(lines)


def _load(load: Any) -> str:
    if not isinstance(load, dict):
        return "-"
    tokens = load.get("tokens_per_s", 0)
    rate = f"{tokens:.1f}" if isinstance(tokens, int | float) else "?"
    return f"{load.get('inflight', 0)} in flight, {rate} tok/s"


def _last_seen(peer: dict[str, Any], now: float) -> str:
    if peer.get("self"):
        return "self"
    seen = peer.get("last_seen")
    if not isinstance(seen, int | float):
        return "never"
    return f"{_age(now - seen)} ago"


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:.0f}s"


def _rtt(rtt: Any) -> str:
    return f"{rtt:.1f} ms" if isinstance(rtt, int | float) else "-"
