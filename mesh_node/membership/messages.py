"""Membership messages (type ids 0x20-0x3F) and the structs they carry.

Two kinds of knowledge travel, with different rules:
* claims (alive / suspect / dead / left) spread by gossip; each is signed by the node that
  says it, so a relay cannot forge one; only a node itself can say it is alive or has left;
* a node's state (hardware, models, load, ...) is accepted only from that node, over a
  connection authenticated as that node: `StateRequest`/`PeerState` and `StateDelta`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Claim:
    """A signed statement about a node's liveness.

    kind: "alive" | "left" (speaker == subject), "suspect" | "dead" (speaker != subject).
    Signature: Ed25519 by `speaker` over claim_payload() (see claims.py / PROTOCOL.md).
    """

    kind: str
    subject: bytes
    incarnation: int
    speaker: bytes
    addresses: list[Address]
    signature: bytes


@dataclass(frozen=True, slots=True)
class Gpu:
    name: str
    vram_total: int
    vram_free: int


@dataclass(frozen=True, slots=True)
class Hardware:
    cpu_cores: int
    ram_total: int
    ram_free: int
    gpus: list[Gpu] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    architecture: str
    bytes: int
    parameters: int
    experts: int = 0
    # expert parallelism (MoE models): bytes of the model without its routed experts, the
    # bytes this node offers for holding routed experts of this model (0: it does not take
    # part), the digest of the expert rankings it plans with (meaningful from the host), and
    # the fingerprint of the expert plan this node follows ("" when none)
    trunk_bytes: int = 0
    expert_budget: int = 0
    rankings: str = ""
    expert_plan: str = ""
    # independent-shard mode: this node serves the model as one shard (trunk, the hot core,
    # its own experts; the router restricted to them)
    shard: bool = False
    # 16 hex digits identifying this node's copy of the checkpoint (config, tokenizer, tensor
    # layout, sampled weights: placement.rankings.checkpoint_fingerprint); "" when unknown.
    # A split model's experts are planned only on nodes whose copy is the host's
    checkpoint: str = ""


@dataclass(frozen=True, slots=True)
class ExpertShard:
    model: str
    layer: int
    experts: list[int]


@dataclass(frozen=True, slots=True)
class Load:
    inflight: int = 0
    tokens_per_s: float = 0.0


@dataclass(frozen=True, slots=True)
class PeerState:
    """Everything a node publishes about itself. `version` grows with every change."""

    node: bytes
    version: int
    incarnation: int
    name: str
    software: str
    role: str
    addresses: list[Address]
    hardware: Hardware | None = None
    models_on_disk: list[ModelInfo] = field(default_factory=list)
    models_served: list[str] = field(default_factory=list)
    expert_shards: list[ExpertShard] = field(default_factory=list)
    load: Load = field(default_factory=Load)
    # the machine (kernel) the node runs on, fixed for the node's life: nodes sharing one
    # share its memory bandwidth (see placement.expert_plan); "" when unknown
    machine: str = ""


@dataclass(frozen=True, slots=True)
class StateDelta:
    """The fields of the sender's own state that changed from `base` to `version`
    (None: unchanged). Sent by a node about itself only."""

    node: bytes
    base: int
    version: int
    incarnation: int | None = None
    name: str | None = None
    role: str | None = None
    addresses: list[Address] | None = None
    hardware: Hardware | None = None
    models_on_disk: list[ModelInfo] | None = None
    models_served: list[str] | None = None
    expert_shards: list[ExpertShard] | None = None
    load: Load | None = None


@dataclass(frozen=True, slots=True)
class Probe:
    """Are you alive? Carries gossip and the sender's own state version."""

    seq: int
    state_version: int
    claims: list[Claim] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ProbeAck:
    seq: int
    state_version: int
    claims: list[Claim] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ProbeRequest:
    """Probe `target` for me (indirect probe); answered by ProbeResult."""

    target: bytes
    addresses: list[Address]
    claims: list[Claim] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ProbeResult:
    ok: bool
    claims: list[Claim] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Gossip:
    """One-way push of claims."""

    claims: list[Claim]


@dataclass(frozen=True, slots=True)
class SyncRequest:
    """Anti-entropy: the sender's view digest, and (when pushing) all its claims."""

    digest: bytes
    claims: list[Claim] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class SyncReply:
    """The receiver's digest, and all its claims when the digests differ."""

    digest: bytes
    claims: list[Claim] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class StateRequest:
    """Ask a node for its own current state (answered by PeerState)."""


MEMBERSHIP_MESSAGES: dict[int, type] = {
    0x20: Probe,
    0x21: ProbeAck,
    0x22: ProbeRequest,
    0x23: ProbeResult,
    0x24: Gossip,
    0x25: SyncRequest,
    0x26: SyncReply,
    0x27: StateRequest,
    0x28: PeerState,
    0x29: StateDelta,
}
