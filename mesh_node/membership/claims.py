"""Claims: signing, verification, limits, and which claim wins.

Signed payload: "mesh-node/1 claim\\0" | mesh_tag(16) | msgpack([kind, subject, incarnation,
speaker, [[host, port], ...]]). The mesh tag binds a claim to one mesh.

Precedence (per subject; "dead" and "left" are tombstones): claims are ordered by
(incarnation, kind) with alive < suspect < dead < left, and the higher one wins, except that
a suspicion never replaces a tombstone. So, as in SWIM, suspect(i) beats alive(i), alive(i+1)
refutes suspect(i), dead(i) beats both, and a tombstone is lifted only by alive at a higher
incarnation (the node came back): a suspicion is about a live node, and anyone may make one
up, so it must not turn the dead or the departed into live members.
"""

from __future__ import annotations

import collections
import hashlib

import msgpack

from mesh_node.identity import NodeId, NodeIdentity
from mesh_node.membership.messages import Address, Claim
from mesh_node.transport.addresses import address_error

ALIVE, SUSPECT, DEAD, LEFT = "alive", "suspect", "dead", "left"
KINDS = (ALIVE, SUSPECT, DEAD, LEFT)
TOMBSTONES = (DEAD, LEFT)
# "node X ..." in log lines and errors
STATUS_PHRASES = {ALIVE: "is alive", SUSPECT: "is suspected", DEAD: "is dead", LEFT: "has left"}
SELF_SPOKEN = (ALIVE, LEFT)
_LABEL = b"mesh-node/1 claim\x00"
MAX_ADDRESSES = 8
MAX_HOST = 255
MAX_INCARNATION = 2**63 - 1
# Suspicions and deaths may name incarnations up to here only: their subject refutes one by
# moving above it, so a claim at the very top would leave it no valid alive claim to make
# (incarnations start at a node's start time in milliseconds, ~2**41, and grow by one per
# refutation: none gets near this).
MAX_ACCUSED = MAX_INCARNATION - 2**32


def claim_payload(
    mesh_tag: bytes,
    kind: str,
    subject: bytes,
    incarnation: int,
    speaker: bytes,
    addresses: list[Address],
) -> bytes:
    body = msgpack.packb(
        [kind, subject, incarnation, speaker, [[a.host, a.port] for a in addresses]],
        use_bin_type=True,
    )
    return _LABEL + mesh_tag + body


def make_claim(
    identity: NodeIdentity,
    mesh_tag: bytes,
    kind: str,
    subject: NodeId,
    incarnation: int,
    addresses: list[Address] | None = None,
) -> Claim:
    addresses = list(addresses or [])
    speaker = identity.node_id.key
    payload = claim_payload(mesh_tag, kind, subject.key, incarnation, speaker, addresses)
    return Claim(kind, subject.key, incarnation, speaker, addresses, identity.sign(payload))


def shape_error(claim: Claim) -> str | None:
    """Why this claim is malformed, or None. Checked before the (costlier) signature."""
    if claim.kind not in KINDS:
        return f"unknown claim kind {claim.kind!r}"
    if len(claim.subject) != 32 or len(claim.speaker) != 32 or len(claim.signature) != 64:
        return "claim ids must be 32 bytes and its signature 64"
    if not 0 <= claim.incarnation <= MAX_INCARNATION:
        return "claim incarnation out of range"
    if claim.kind in (SUSPECT, DEAD) and claim.incarnation > MAX_ACCUSED:
        return f"a {claim.kind} claim's incarnation must be at most {MAX_ACCUSED}"
    if (claim.kind in SELF_SPOKEN) != (claim.speaker == claim.subject):
        who = "its subject" if claim.kind in SELF_SPOKEN else "another node"
        return f"a {claim.kind} claim must be spoken by {who}"
    if claim.kind == ALIVE:
        if not 0 < len(claim.addresses) <= MAX_ADDRESSES:
            return f"an alive claim needs 1..{MAX_ADDRESSES} addresses"
    elif claim.addresses:
        return f"a {claim.kind} claim carries no addresses"
    for address in claim.addresses:
        if not 0 < len(address.host) <= MAX_HOST or address_error(address.host, address.port):
            return "claim address out of range"
    return None


class Verifier:
    """Checks claim signatures, remembering results (bounded): the same claim reaches a node
    many times through gossip but is verified once. Shared by all nodes of a process."""

    def __init__(self, size: int = 1 << 16):
        self._seen: collections.OrderedDict[bytes, bool] = collections.OrderedDict()
        self._size = size

    def verify(self, mesh_tag: bytes, claim: Claim) -> bool:
        payload = claim_payload(
            mesh_tag, claim.kind, claim.subject, claim.incarnation, claim.speaker, claim.addresses
        )
        key = hashlib.sha256(payload + claim.signature).digest()
        known = self._seen.get(key)
        if known is not None:
            self._seen.move_to_end(key)
            return known
        ok = NodeId(claim.speaker).verify(claim.signature, payload)
        self._seen[key] = ok
        if len(self._seen) > self._size:
            self._seen.popitem(last=False)
        return ok


VERIFIER = Verifier()


_ORDER = {ALIVE: 0, SUSPECT: 1, DEAD: 2, LEFT: 3}


def rank(kind: str, incarnation: int) -> tuple[int, int]:
    """Claims about a subject are totally ordered: the view holds the highest one seen, so
    nodes that saw the same alive, dead and left claims agree whatever order they came in.
    (A suspicion counts only while its subject is live in the view; one that arrived before
    the subject's alive claim, or after its tombstone, is dropped. Views that differ so
    agree again at the subject's refutation or death, which every view takes.)"""
    return (incarnation, _ORDER[kind])


def outranks(kind: str, incarnation: int, old_kind: str, old_incarnation: int) -> bool:
    """Does a claim (kind, incarnation) replace the current (old_kind, old_incarnation)?
    The higher rank does, but a suspicion never replaces a tombstone (see above)."""
    if kind == SUSPECT and old_kind in TOMBSTONES:
        return False
    return rank(kind, incarnation) > rank(old_kind, old_incarnation)
