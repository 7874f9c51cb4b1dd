"""The status document as `rich` tables for a terminal (`mesh-node status`).

Data from the mesh is never interpreted as rich markup (a node may call itself
"[red]x"): every cell is a `Text`.
"""

from __future__ import annotations

import time
from typing import Any

from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from mesh_node.english import counted
from mesh_node.terminal import fits

STATUS_STYLES = {"alive": "bold green", "suspect": "bold yellow", "dead": "bold red", "left": "dim"}
GONE = frozenset({"dead", "left"})
NOT_ALIVE = GONE | {"suspect"}  # (named beside a node in the lists of nodes)
KNOWN_KEYS = frozenset({"node", "mesh", "peers", "models", "shards"})


def render_status(document: dict[str, Any], console: Console, now: float | None = None) -> None:
    """Print the summary line, the nodes table, the models table, the shards (if any), and
    other keys' names."""
    now = time.time() if now is None else now
    document = _printable(document)  # peers' names reach this terminal: no escape sequences
    peers = sorted(document.get("peers", []), key=_peer_order)
    console.print(_summary(document, peers))
    console.print(nodes_table(peers, now, console))
    console.print(models_table(document.get("models", []), {p["id"]: p for p in peers}, console))
    shards = shards_section(document.get("shards"), peers, document.get("node"))
    if shards is not None:
        console.print(shards)
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


def nodes_table(peers: list[dict[str, Any]], now: float, console: Console) -> Table:
    """A column per fact and a line per device where that fits in the console's width, else
    the compact table (for an 80-column terminal): each node's name under its id, its RAM and
    GPUs under its core count, its round-trip time under its last-seen age."""
    wide = _nodes_table(peers, now, compact=False)
    if fits(wide, console):
        return wide
    return _nodes_table(peers, now, compact=True)


def _nodes_table(peers: list[dict[str, Any]], now: float, *, compact: bool) -> Table:
    table = Table(title="Nodes", title_justify="left", box=box.SIMPLE_HEAD)
    if compact:  # (a node's facts on several lines: a blank line between nodes)
        table.pad_edge, table.collapse_padding, table.leading = False, True, 1
    # (compact: a long name folds onto more lines rather than take the hardware's room)
    table.add_column(
        "node",
        no_wrap=not compact,
        min_width=10,
        max_width=16 if compact else None,
        overflow="fold",
    )
    table.add_column("status", no_wrap=True)
    table.add_column("role", no_wrap=True)
    table.add_column("hardware", overflow="fold")
    table.add_column("load", overflow="fold")
    if compact:
        table.add_column("seen, rtt", no_wrap=True)
    else:
        table.add_column("last seen", no_wrap=True)
        table.add_column("rtt", justify="right", no_wrap=True)
    for peer in peers:
        status = str(peer.get("status", "?"))
        node = Text(_short(peer), "bold" if peer.get("self") else "")
        space = "\n" if compact else " "  # (compact: the id, name and "(this node)" one a line)
        if peer.get("name"):
            node.append(f"{space}{peer['name']}")
        if peer.get("self"):
            node.append(f"{space}(this node)", "dim")
        timing = [Text(_last_seen(peer, now)), Text(_rtt(peer.get("rtt_ms")))]
        if compact:
            timing = [Text("\n").join(t for t in timing if t.plain != "-")]
        table.add_row(
            node,
            Text(status, STATUS_STYLES.get(status, "")),
            Text(str(peer.get("role", "?"))),
            Text(_hardware(peer.get("hardware"), compact)),
            Text(_load(peer.get("load"), compact)),
            *timing,
            style="dim" if status in GONE else None,
        )
    if not peers:
        table.add_row(Text("no nodes known", "dim"), *[""] * (len(table.columns) - 1))
    return table


def models_table(
    models: list[dict[str, Any]], peers: dict[str, dict[str, Any]], console: Console
) -> Table:
    """The nodes serving and holding each model, listed on a line where that fits in the
    console's width, else one per line."""
    table = _models_table(models, peers, ", ")
    if fits(table, console):
        return table
    return _models_table(models, peers, "\n")


def _models_table(
    models: list[dict[str, Any]], peers: dict[str, dict[str, Any]], separator: str
) -> Table:
    table = Table(title="Models", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("model", no_wrap=True, overflow="fold")
    table.add_column("served by", overflow="fold")
    table.add_column("on disk at", overflow="fold")
    for model in models:
        served_by = model.get("served_by") or []
        table.add_row(
            Text(str(model.get("name"))),
            Text(
                _node_list(served_by, peers, separator) if served_by else "nobody",
                "" if served_by else "dim",
            ),
            Text(_node_list(model.get("on_disk") or [], peers, separator)),
        )
    if not models:
        table.add_row(Text("no models on any node yet", "dim"), "", "")
    return table


def shards_section(shards: Any, peers: list[dict[str, Any]], this_node: Any) -> Group | None:
    """Independent-shard mode (`--moe-shards`): a table of each model's shard nodes in shard
    order with the experts per layer of their shard, then per model its quality line and the
    split's digests. None when this node serves no model as shards."""
    entries = [e for e in shards if isinstance(e, dict)] if isinstance(shards, list) else []
    if not entries:
        return None
    by_id = {p.get("id"): p for p in peers}
    table = Table(title="Shards", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("model", no_wrap=True)
    table.add_column("shard", no_wrap=True)
    table.add_column("node")
    table.add_column("experts per layer")
    notes = []
    for entry in entries:
        model = str(entry.get("model", "?"))
        nodes = entry.get("nodes") if isinstance(entry.get("nodes"), list) else []
        count = entry.get("shards") if isinstance(entry.get("shards"), int) else len(nodes)
        mine = entry.get("shard") if isinstance(entry.get("shard"), int) else None
        changed = len(nodes) != count or (
            mine is not None and this_node is not None and nodes[mine : mine + 1] != [this_node]
        )
        held = _shard_count(entry.get("experts"))
        per_shard = entry.get("experts_per_shard")
        for i, node in enumerate(nodes):
            if node == this_node and held is not None:
                experts = held
            elif isinstance(per_shard, list) and i < len(per_shard) and not changed:
                experts = per_shard[i]
            else:
                experts = None
            name = Text(_node_list([node], by_id, ", "))
            if node == this_node:
                name.append(" (this node)", "dim")
            table.add_row(
                Text(model if i == 0 else ""),
                Text(f"{i + 1} of {len(nodes)}"),
                name,
                Text(_shard_experts(experts, entry)),
            )
        if not nodes:
            table.add_row(Text(model), Text("-"), Text("no shard nodes known", "dim"), Text("-"))
        note = Text(f"{model}: ")
        quality = entry.get("quality")
        if quality == "measuring":
            quality = "quality being measured (each shard against the whole model)"
        note.append(str(quality or "quality not reported"))
        digests = [f"{k} {entry[k]}" for k in ("plan", "rankings") if entry.get(k)]
        if digests:
            note.append(f" ({', '.join(digests)})", "dim")
        if changed:
            note.append(
                f"; the shard nodes changed ({len(nodes)} now, {count} in the split loaded here):"
                " splitting again",
                "yellow",
            )
        notes.append(note)
    return Group(table, *notes)


def _shard_count(experts: Any) -> int | None:
    """Experts per layer of a shard from its `{"<layer>": [int]}` (the fewest, should layers
    differ); None when not known."""
    if not isinstance(experts, dict):
        return None
    sizes = [len(ids) for ids in experts.values() if isinstance(ids, list)]
    return min(sizes) if sizes else None


def _shard_experts(count: Any, entry: dict[str, Any]) -> str:
    if not isinstance(count, int):
        return "-"
    total = entry.get("num_experts")
    text = f"{count} of {total}" if isinstance(total, int) else str(count)
    core = _shard_count(entry.get("core"))
    return f"{text} ({core} core + {count - core} own)" if core is not None else text


def _summary(document: dict[str, Any], peers: list[dict[str, Any]]) -> Text:
    counts = {s: sum(1 for p in peers if p.get("status") == s) for s in STATUS_STYLES}
    mesh = document.get("mesh") if isinstance(document.get("mesh"), dict) else {}
    text = Text("mesh: ")
    nodes = mesh.get("nodes", len(peers))
    text.append(counted(nodes, "node") if isinstance(nodes, int) else f"{nodes} nodes", "bold")
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


def _node_list(ids: Any, peers: dict[str, dict[str, Any]], separator: str) -> str:
    names = []
    for node_id in ids if isinstance(ids, list) else []:
        peer = peers.get(node_id) if isinstance(node_id, str) else None
        name = str(peer.get("name") or _short(peer)) if peer else str(node_id)[:10]
        names.append(
            f"{name} ({peer.get('status')})" if peer and peer.get("status") in NOT_ALIVE else name
        )
    return separator.join(names)


def _gib(n: Any, compact: bool = False) -> str:
    if not isinstance(n, int | float):
        return "?"
    gib = n / (1 << 30)
    return f"{gib:.0f}" if compact and gib >= 10 else f"{gib:.1f}"


def _hardware(hardware: Any, compact: bool = False) -> str:
    """Wide: a line for the CPU and RAM, one per GPU. Compact: the core count, the RAM, and each
    GPU's name and memory on lines of their own, with whole GiB from 10 GiB up."""
    if not isinstance(hardware, dict):
        return "not known yet"

    def memory(free: Any, total: Any) -> str:
        return f"{_gib(free, compact)}/{_gib(total, compact)} GiB free"

    cores = f"{hardware.get('cpu_cores', '?')} cores"
    ram = memory(hardware.get("ram_free"), hardware.get("ram_total"))
    lines = [cores, f"RAM {ram}"] if compact else [f"{cores}, RAM {ram}"]
    gpus = hardware.get("gpus")
    for gpu in gpus if isinstance(gpus, list) else []:
        if not isinstance(gpu, dict):
            continue
        vram = memory(gpu.get("vram_free"), gpu.get("vram_total"))
        name = str(gpu.get("name", "GPU"))
        lines += [name, f"VRAM {vram}"] if compact else [f"{name} {vram}"]
    return "\n".join(lines)


def _load(load: Any, compact: bool = False) -> str:
    if not isinstance(load, dict):
        return "-"
    tokens = load.get("tokens_per_s", 0)
    rate = f"{tokens:.1f}" if isinstance(tokens, int | float) else "?"
    separator = "\n" if compact else ", "
    return f"{load.get('inflight', 0)} in flight{separator}{rate} tok/s"


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
