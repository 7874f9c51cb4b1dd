"""The peer table: one record per node of the mesh, this node included. It owns the view;
everything else reads snapshots or subscribes to its change events.

Claims change a member's status (see claims.py for which claim wins); a member's state is
replaced only by that member's own newer state. Dead and left members stay as tombstones,
so old gossip cannot bring them back; only a newer incarnation (a real rejoin) does. Once a
tombstone is forgotten (after its TTL) the table still remembers, in a bounded list, which
incarnation it was, so another node's copy of the tombstone, forgotten a little later,
cannot bring it back either. A full table makes room for a live node by forgetting its
oldest tombstone.

Members come only from their own alive or left claims, or from a death (a tombstone: never
a live member). A suspicion of a node the table does not hold is dropped: anyone can
suspect a made-up id. A death of one is kept as a tombstone (bounded like any member, and
never taking a live member's place), because a node joining late learns the dead only so
(a view carries a dead member's death, not its old alive claim): without it its view, and
so its digest, would differ from everyone else's until the others forget the tombstone, and
a stale copy of the dead node's alive claim would bring it back there.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from mesh_node.identity import NodeId
from mesh_node.membership.claims import ALIVE, SUSPECT, TOMBSTONES, outranks
from mesh_node.membership.messages import Address, Claim, PeerState, StateDelta

log = logging.getLogger("mesh_node.membership")

MAX_ACCUSERS = 32  # confirmations kept per suspicion (Lifeguard needs a few)

# what changed about a member, for listeners
STATUS, STATE, CONTACT, REMOVED = "status", "state", "contact", "removed"


@dataclass(slots=True)
class Member:
    node_id: NodeId
    status: str
    incarnation: int
    status_claim: Claim
    status_since: float  # loop time
    alive_claim: Claim | None = None  # the latest alive claim: where to reach the node
    accusers: set[bytes] = field(default_factory=set)  # who suspects it (this incarnation)
    state: PeerState | None = None  # only ever from the node itself
    last_seen: float | None = None  # loop time of the last direct answer
    rtt: float | None = None

    @property
    def addresses(self) -> list[Address]:
        return list(self.alive_claim.addresses) if self.alive_claim is not None else []

    @property
    def state_version(self) -> int:
        return self.state.version if self.state is not None else 0

    @property
    def live(self) -> bool:
        return self.status in (ALIVE, SUSPECT)


Listener = Callable[[Member, str], None]


class PeerTable:
    def __init__(
        self,
        self_id: NodeId,
        clock: Callable[[], float],
        *,
        max_members: int = 4096,
        tombstone_ttl: float = 24 * 3600.0,
    ):
        self.self_id = self_id
        self._clock = clock
        self._members: dict[NodeId, Member] = {}
        self._max = max_members
        self._ttl = tombstone_ttl
        self._listeners: list[Listener] = []
        self._digest: bytes | None = None
        self._peers_by_status: dict[tuple[str, ...], list[Member]] = {}
        self._full_warned = False
        # forgotten tombstones: node -> the incarnation it died or left at (oldest first)
        self._forgotten: OrderedDict[NodeId, int] = OrderedDict()

    # ---- reading
    def get(self, node_id: NodeId) -> Member | None:
        return self._members.get(node_id)

    def __iter__(self) -> Iterator[Member]:
        return iter(list(self._members.values()))

    def __len__(self) -> int:
        return len(self._members)

    def peers(self, *statuses: str) -> list[Member]:
        """Members other than this node, optionally only those with the given statuses.
        (Cached until a status changes: probing and gossip ask many times a second.)"""
        cached = self._peers_by_status.get(statuses)
        if cached is None:
            cached = self._peers_by_status[statuses] = [
                m
                for m in self._members.values()
                if m.node_id != self.self_id and (not statuses or m.status in statuses)
            ]
        return list(cached)

    def live_peers(self) -> list[Member]:
        return self.peers(ALIVE, SUSPECT)

    def forgotten(self, node_id: NodeId) -> int | None:
        """The incarnation at which this table forgot `node_id`'s tombstone, if it did (and
        has not seen it rejoin since)."""
        return self._forgotten.get(node_id)

    def digest(self) -> bytes:
        """A hash of who is in which status at which incarnation: equal views, equal digests."""
        if self._digest is None:
            h = hashlib.sha256()
            for node_id in sorted(self._members):
                m = self._members[node_id]
                h.update(node_id.key + m.status.encode() + m.incarnation.to_bytes(8, "big"))
            self._digest = h.digest()
        return self._digest

    def sync_claims(self) -> list[Claim]:
        """Every claim needed to rebuild this view elsewhere."""
        claims: list[Claim] = []
        for m in self._members.values():
            if m.status == SUSPECT and m.alive_claim is not None:
                claims.append(m.alive_claim)  # so a newcomer also learns where it lives
            claims.append(m.status_claim)
        return claims

    # ---- changing
    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def unsubscribe(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _is_live_member(self, key: bytes) -> bool:
        """Whether the node with this key is a member not known to be gone: only such nodes'
        suspicions count as confirmations (keys nobody met could be made up by the dozen)."""
        member = self._members.get(NodeId(key))
        return member is not None and member.status in (ALIVE, SUSPECT)

    def _changed(self, member: Member, what: str) -> None:
        if what in (STATUS, REMOVED):
            self._digest = None
            self._peers_by_status.clear()
        for listener in self._listeners:
            listener(member, what)

    def apply(self, claim: Claim) -> Member | None:
        """Apply a verified claim. Returns the member when the claim is news (its status or
        addresses changed, or one more node suspects it), None when stale or known.

        The status is the highest-ranked claim seen (claims.outranks: a suspicion counts
        only while the member is live); where a node lives is its highest alive claim, kept
        separately."""
        subject = NodeId(claim.subject)
        member = self._members.get(subject)
        now = self._clock()
        if member is None:
            return self._new_member(claim, now)
        news = False
        if claim.kind == ALIVE and (
            member.alive_claim is None or claim.incarnation > member.alive_claim.incarnation
        ):
            member.alive_claim = claim  # where it lives now
            news = True
        if (
            claim.kind == SUSPECT
            and member.status == SUSPECT
            and claim.incarnation == member.incarnation
        ):
            if (
                claim.speaker not in member.accusers
                and len(member.accusers) < MAX_ACCUSERS
                and self._is_live_member(claim.speaker)
            ):
                member.accusers.add(claim.speaker)  # one more independent confirmation
                news = True
        elif outranks(claim.kind, claim.incarnation, member.status, member.incarnation):
            if member.status != claim.kind or claim.kind == SUSPECT:
                member.status_since = now  # a suspicion of a new incarnation starts afresh
            member.status, member.incarnation = claim.kind, claim.incarnation
            member.status_claim = claim
            member.accusers = {claim.speaker} if claim.kind == SUSPECT else set()
            news = True
        if not news:
            return None
        self._changed(member, STATUS)
        return member

    def _new_member(self, claim: Claim, now: float) -> Member | None:
        """A member from its first claim; None when that is a suspicion (of a node we do not
        know, or forgot), the table is full of live members, or the node was forgotten at
        this incarnation."""
        if claim.kind == SUSPECT:
            return None
        subject = NodeId(claim.subject)
        forgotten = self._forgotten.get(subject)
        if forgotten is not None:
            if claim.incarnation <= forgotten:
                return None  # a tombstone we already forgot: it stays forgotten
            del self._forgotten[subject]  # a newer incarnation: a real rejoin
        if len(self._members) >= self._max and not self._evict_tombstone(claim):
            if not self._full_warned:
                log.warning("peer table full (%d members): ignoring new nodes", self._max)
                self._full_warned = True
            return None
        member = Member(subject, claim.kind, claim.incarnation, claim, now)
        if claim.kind == ALIVE:
            member.alive_claim = claim
        self._members[subject] = member
        self._changed(member, STATUS)
        return member

    def _evict_tombstone(self, claim: Claim) -> bool:
        """Make room for a live node (table full): forget the oldest tombstone. False when
        the claim is no alive one or every member is live."""
        if claim.kind != ALIVE:
            return False
        tombstones = [m for m in self._members.values() if m.status in TOMBSTONES]
        if not tombstones:
            return False
        self._forget(min(tombstones, key=lambda m: m.status_since))
        return True

    def _forget(self, member: Member) -> None:
        del self._members[member.node_id]
        self._forgotten[member.node_id] = member.incarnation
        self._forgotten.move_to_end(member.node_id)
        while len(self._forgotten) > self._max:
            self._forgotten.popitem(last=False)
        self._changed(member, REMOVED)

    def apply_state(self, state: PeerState) -> bool:
        """A member's own full state (received from it). True when it is newer: a higher
        incarnation, or the same one at a higher version (a restarted node's versions start
        from its clock, which may be behind its previous run's)."""
        member = self._members.get(NodeId(state.node))
        if member is None or not member.live:
            return False
        held = member.state
        if held is not None and (state.incarnation, state.version) <= (
            held.incarnation,
            held.version,
        ):
            return False
        member.state = state
        self._changed(member, STATE)
        return True

    def apply_delta(self, delta: StateDelta) -> str:
        """A member's own state change. "applied", "stale", or "gap" (fetch the full state)."""
        member = self._members.get(NodeId(delta.node))
        if member is None or not member.live:
            return "stale"
        if member.state is None or (
            member.state.incarnation < member.incarnation and delta.base != member.state.version
        ):
            return "gap"  # it moved to a new incarnation (a restart, say): fetch its state
        if delta.version <= member.state_version:
            return "stale"
        if delta.base != member.state.version:
            return "gap"
        changes = {
            name: getattr(delta, name)
            for name in (
                "incarnation",
                "name",
                "role",
                "addresses",
                "hardware",
                "models_on_disk",
                "models_served",
                "expert_shards",
                "load",
            )
            if getattr(delta, name) is not None
        }
        member.state = replace(member.state, version=delta.version, **changes)
        self._changed(member, STATE)
        return "applied"

    def contact(self, node_id: NodeId, rtt: float | None = None) -> None:
        """We heard directly from `node_id` (it answered a probe, or sent us something)."""
        member = self._members.get(node_id)
        if member is None:
            return
        member.last_seen = self._clock()
        if rtt is not None:
            member.rtt = rtt
        self._changed(member, CONTACT)

    def reap(self) -> list[Member]:
        """Forget tombstones older than the TTL."""
        now = self._clock()
        gone = [
            m
            for m in self._members.values()
            if m.status in TOMBSTONES and now - m.status_since > self._ttl
        ]
        for member in gone:
            self._forget(member)
        return gone
