"""This node's own state (what it publishes about itself), and the limits on any state.

State versions start at the node's start time in milliseconds and grow by one per change,
so a restarted node's state is always newer than anything it published before.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import fields, replace
from typing import Any

from mesh_node.membership.messages import (
    Address,
    ExpertShard,
    Gpu,
    Hardware,
    Load,
    ModelInfo,
    PeerState,
    StateDelta,
)
from mesh_node.transport.addresses import address_error

log = logging.getLogger("mesh_node.membership")

ROLES = ("host", "worker", "client")
MAX_TEXT = 256
MAX_NAME = 64
MAX_MACHINE = 64
MAX_ADDRESSES = 8
MAX_MODELS = 256
MAX_GPUS = 16
MAX_SHARDS = 8192
MAX_EXPERTS_PER_SHARD = 1024
_DELTA_FIELDS = tuple(
    f.name for f in fields(StateDelta) if f.name not in ("node", "base", "version")
)


def _number_error(value: float, what: str) -> str | None:
    """Why a count or size is not a finite number of at least 0 (NaN would break the JSON of
    /api/status on every node), or None."""
    if not math.isfinite(value) or value < 0:
        return f"{what} must be a finite number >= 0, got {value!r:.30}"
    return None


def state_error(state: PeerState | StateDelta) -> str | None:
    """Why a state (or delta) is out of bounds, or None. Oversized state is refused whole."""

    def text(value: str | None, limit: int, what: str) -> str | None:
        if value is not None and len(value) > limit:
            return f"{what} longer than {limit} characters"
        if value is not None and not value.isprintable():  # no escape sequences for terminals
            return f"{what} holds control characters"
        return None

    checks: list[str | None] = [
        text(getattr(state, "name", None), MAX_NAME, "name"),
        text(getattr(state, "software", None), MAX_TEXT, "software"),
        text(getattr(state, "machine", None), MAX_MACHINE, "machine"),
    ]
    role = getattr(state, "role", None)
    if role is not None and role not in ROLES:
        checks.append(f"role must be one of {', '.join(ROLES)}")
    addresses = state.addresses
    if addresses is not None:
        if len(addresses) > MAX_ADDRESSES:
            checks.append(f"more than {MAX_ADDRESSES} addresses")
        checks += [text(a.host, MAX_TEXT, "address") for a in addresses]
        checks += [address_error(a.host, a.port) for a in addresses]
    load = getattr(state, "load", None)
    if load is not None:
        checks += [_number_error(load.inflight, "load.inflight")]
        checks += [_number_error(load.tokens_per_s, "load.tokens_per_s")]
    hardware = state.hardware
    if hardware is not None:
        checks += [
            _number_error(getattr(hardware, name), f"hardware.{name}")
            for name in ("cpu_cores", "ram_total", "ram_free")
        ]
        for gpu in hardware.gpus:
            checks += [_number_error(gpu.vram_total, "GPU memory")]
            checks += [_number_error(gpu.vram_free, "GPU memory")]
    if hardware is not None and len(hardware.gpus) > MAX_GPUS:
        checks.append(f"more than {MAX_GPUS} GPUs")
    if hardware is not None:
        checks += [text(g.name, MAX_TEXT, "GPU name") for g in hardware.gpus]
    for name in ("models_on_disk", "models_served"):
        items = getattr(state, name)
        if items is not None and len(items) > MAX_MODELS:
            checks.append(f"{name} lists more than {MAX_MODELS} models")
        for item in items or ():
            label = item if isinstance(item, str) else item.name
            checks.append(text(label, MAX_TEXT, "model name"))
            if not isinstance(item, str):
                for what in ("architecture", "rankings", "expert_plan", "checkpoint"):
                    checks.append(text(getattr(item, what), MAX_TEXT, what))
    shards = state.expert_shards
    if shards is not None:
        if len(shards) > MAX_SHARDS:
            checks.append(f"more than {MAX_SHARDS} expert shards")
        for shard in shards:
            checks.append(text(shard.model, MAX_TEXT, "model name"))
            if len(shard.experts) > MAX_EXPERTS_PER_SHARD:
                checks.append(f"a shard lists more than {MAX_EXPERTS_PER_SHARD} experts")
    return next((c for c in checks if c), None)


class SelfState:
    """Holds this node's PeerState; every change bumps the version."""

    def __init__(
        self,
        node: bytes,
        *,
        start_version: int,
        name: str,
        software: str,
        role: str,
        addresses: list[Address],
        hardware: Hardware | None = None,
        machine: str = "",
    ):
        self.current = PeerState(
            node=node,
            version=start_version,
            incarnation=start_version,
            name=name[:MAX_NAME],
            software=software,
            role=role,
            addresses=addresses,
            hardware=hardware,
            machine=machine,
        )
        problem = state_error(self.current)
        if problem:
            raise ValueError(f"this node's state is invalid: {problem}")

    def update(self, **changes: Any) -> bool:
        """Change some fields; returns False when nothing actually changed."""
        unknown = set(changes) - set(_DELTA_FIELDS)
        if unknown:
            raise TypeError(f"not state fields: {', '.join(sorted(unknown))}")
        different = {k: v for k, v in changes.items() if getattr(self.current, k) != v}
        if not different:
            return False
        updated = replace(self.current, version=self.current.version + 1, **different)
        problem = state_error(updated)
        if problem:
            raise ValueError(f"this node's state would be invalid: {problem}")
        self.current = updated
        return True

    def delta_since(self, base: PeerState) -> StateDelta:
        """The delta that turns `base` (an earlier state of ours) into the current one."""
        now = self.current
        changed = {
            name: getattr(now, name)
            for name in _DELTA_FIELDS
            if getattr(now, name) != getattr(base, name)
        }
        return StateDelta(node=now.node, base=base.version, version=now.version, **changed)


def machine_id(boot_id: str = "/proc/sys/kernel/random/boot_id") -> str:
    """A label for the machine this process runs on: 16 hex digits hashed from the Linux
    kernel's boot id, which every process, container and network namespace on one running
    kernel shares (and so its memory and memory bandwidth). "" where there is none."""
    try:
        with open(boot_id, "rb") as f:
            raw = f.read().strip()
    except OSError:
        return ""
    return hashlib.sha256(b"mesh-node machine\0" + raw).hexdigest()[:16] if raw else ""


def probe_hardware(with_gpus: bool = True) -> Hardware:
    """CPU cores, RAM (from /proc/meminfo where present), and GPUs through torch if it sees
    any. Slow the first time (imports torch): call it off the event loop."""
    cores = os.cpu_count() or 1
    total = free = 0
    try:
        with open("/proc/meminfo") as meminfo:
            values = {
                line.split(":")[0]: int(line.split()[1]) * 1024 for line in meminfo if ":" in line
            }
        total = values.get("MemTotal", 0)
        free = values.get("MemAvailable", values.get("MemFree", 0))
    except OSError:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        except (ValueError, OSError):
            pass
    gpus: list[Gpu] = []
    if with_gpus:
        gpus = _torch_gpus()
    return Hardware(cpu_cores=cores, ram_total=total, ram_free=free, gpus=gpus)


def _torch_gpus() -> list[Gpu]:
    try:
        import torch
    except ImportError:
        return []
    gpus = []
    try:
        if not torch.cuda.is_available():
            return []
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)
            gpus.append(Gpu(torch.cuda.get_device_name(index), int(total), int(free)))
    except Exception as exc:  # a broken driver must not stop the node
        log.warning("could not list GPUs through torch: %s", exc)
    return gpus


__all__ = [
    "ROLES",
    "ExpertShard",
    "Load",
    "ModelInfo",
    "SelfState",
    "probe_hardware",
    "state_error",
]
