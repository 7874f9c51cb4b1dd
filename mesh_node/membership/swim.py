"""The membership service: failure detection (SWIM with Lifeguard's refinements), gossip
of claims, anti-entropy, and the exchange of node states.

* Probing: every probe interval, probe the next member (round robin over a shuffled list)
  directly; failing that, ask `indirect_probes` others to probe it; failing that, suspect it.
* Suspicion: a suspected member is declared dead after a timeout that shrinks as other
  members independently confirm the suspicion (Lifeguard). A member that hears it is
  suspected refutes by raising its incarnation, and tells the node that told it first.
* Coming back: a node that hears directly from a node it holds as dead or left, or has
  forgotten, tells it so; it refutes, and its new alive claim lifts the tombstones. (After a
  split longer than the tombstone TTL, nobody else would: both sides forgot the deaths.)
* Local health (Lifeguard): failed probes, missed nacks, refutations and event-loop lag
  raise a score that stretches our probe interval and timeout, so a slow node does not
  accuse healthy ones.
* Dissemination: claims ride on probes and acks, and are pushed to `gossip_fanout` random
  members every gossip interval, each up to retransmit_mult * log2(N+1) times.
* Anti-entropy: a digest exchange with a random member every sync interval; a full
  push-pull when the digests differ. A joiner does a full push-pull with its seed.
* State: fetched from each member directly (StateRequest); changes pushed by the owner to
  every member (StateDelta). Probes carry the sender's state version, so a missed change
  (or a missed new incarnation's state) is noticed within a probe cycle and fetched.
* Dialing: a member's advertised addresses are tried in turn, each with a share of the
  time, so an address others cannot reach does not hide the node.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from mesh_node.cancellation import cancel_and_wait
from mesh_node.identity import NodeId
from mesh_node.membership.claims import (
    ALIVE,
    DEAD,
    LEFT,
    MAX_ACCUSED,
    MAX_INCARNATION,
    STATUS_PHRASES,
    SUSPECT,
    TOMBSTONES,
    VERIFIER,
    make_claim,
    outranks,
    shape_error,
)
from mesh_node.membership.messages import (
    Address,
    Claim,
    Gossip,
    PeerState,
    Probe,
    ProbeAck,
    ProbeRequest,
    ProbeResult,
    StateDelta,
    StateRequest,
    SyncReply,
    SyncRequest,
)
from mesh_node.membership.state import SelfState, state_error
from mesh_node.membership.table import STATUS, Member, PeerTable
from mesh_node.transport.addresses import address_error
from mesh_node.transport.connection import Connection, RequestContext
from mesh_node.transport.endpoint import Endpoint
from mesh_node.transport.errors import ErrorCode, HandshakeError, RequestFailed, TransportError
from mesh_node.transport.handshake import another_node

log = logging.getLogger("mesh_node.membership")

NACK_SHARE = 0.8  # of its probe timeout, a node asked to probe for another tries (see below)
# A failed probe closes its connection as dead only when nothing at all came back on it
# (not even a QUIC acknowledgement) while it waited this many round trips: a probe and the
# resend of a lost one. Over a link whose round trip nears the probe timeout, a late
# answer is not a dead connection (closing it ends the answers it carries).
SILENT_RTTS = 3
# claims of a view exchange checked between two turns of the event loop (~6 ms of signature
# checks when all are new)
CLAIMS_PER_SLICE = 32
# Another process with our key: this many alive claims about us above our own incarnation
# within TWIN_WINDOW s (our past run leaves one or two), then hold back TWIN_HOLD s.
TWIN_REFUTATIONS = 3
TWIN_WINDOW = 60.0
TWIN_HOLD = 600.0


@dataclass(frozen=True)
class MembershipConfig:
    probe_interval: float = 0.5
    probe_timeout: float = 0.25
    indirect_probes: int = 3
    suspicion_min: float = 1.0  # floor of the suspicion timeout
    suspicion_mult: float = 4.0  # min timeout = mult * log10(N) * probe_interval (>= floor)
    suspicion_max_factor: float = 3.0  # max timeout (no confirmation) = factor * min
    gossip_interval: float = 0.2
    gossip_fanout: int = 3
    retransmit_mult: int = 3
    sync_interval: float = 10.0
    reconnect_interval: float = 5.0  # retry seeds / dead members (heals partitions)
    max_health: int = 8  # Lifeguard local health multiplier ceiling
    max_claims_per_message: int = 32
    max_members: int = 4096
    tombstone_ttl: float = 24 * 3600.0
    fetch_concurrency: int = 16
    push_concurrency: int = 16
    request_timeout: float = 3.0
    lag_interval: float = 0.1  # event-loop lag check period; 0 turns the check off


class _Broadcasts:
    """Claims waiting to be gossiped, each sent a bounded number of times. At most one
    pending claim per (subject, kind, speaker): a newer one replaces it."""

    def __init__(self, limit: int = 4096):
        self._items: dict[tuple[bytes, str, bytes], list[Any]] = {}  # key -> [claim, sends]
        self._limit = limit

    def __len__(self) -> int:
        return len(self._items)

    def add(self, claim: Claim) -> None:
        # claims about the same subject that this one outranks are pointless now
        for key in [k for k in self._items if k[0] == claim.subject]:
            old = self._items[key][0]
            if outranks(claim.kind, claim.incarnation, old.kind, old.incarnation):
                del self._items[key]
        self._items[(claim.subject, claim.kind, claim.speaker)] = [claim, 0]
        if len(self._items) > self._limit:  # drop the most-sent first
            for key, _ in sorted(self._items.items(), key=lambda kv: -kv[1][1])[
                : len(self._items) - self._limit
            ]:
                del self._items[key]

    def take(self, count: int, max_sends: int) -> list[Claim]:
        """Up to `count` claims, least-sent first; each counts as sent once more."""
        if not self._items:
            return []
        chosen = sorted(self._items.items(), key=lambda kv: kv[1][1])[:count]
        for key, item in chosen:
            item[1] += 1
            if item[1] >= max_sends:
                del self._items[key]
        return [item[0] for _, item in chosen]


class _TwinWatch:
    """Notices another process running with this node's key (an old process that was frozen,
    not dead, woken after its replacement started). An alive claim about us above our own
    incarnation is normally our previous run's, and we go above it; claims that keep coming
    back above us after that are a live twin going above our refutations: the two would
    out-refute each other forever, the mesh sending our traffic now to one, now to the
    other. So after a few within a minute we log the cause and, for a while, let the other
    process's claim stand (suspicions and deaths of us are still refuted, so this node
    cannot be declared dead meanwhile)."""

    def __init__(self, clock: Callable[[], float]):
        self._clock = clock
        self._refuted: collections.deque[float] = collections.deque(maxlen=TWIN_REFUTATIONS)
        self._hold_until = -math.inf

    def may_refute(self, claim: Claim, incarnation: int) -> bool:
        """Whether to go above `claim`, an alive claim about us above `incarnation`, ours."""
        now = self._clock()
        if now < self._hold_until:
            return False
        self._refuted.append(now)
        if len(self._refuted) < TWIN_REFUTATIONS or now - self._refuted[0] > TWIN_WINDOW:
            return True
        self._refuted.clear()
        self._hold_until = now + TWIN_HOLD
        log.error(
            "another process is running with this node's key: it announced this node alive "
            "at %s (incarnation %d, ours %d), going above us %d times in %gs. Stop one of the "
            "two processes; until then this one lets the other's claim stand for %gs",
            ", ".join(f"{a.host}:{a.port}" for a in claim.addresses),
            claim.incarnation,
            incarnation,
            TWIN_REFUTATIONS,
            TWIN_WINDOW,
            TWIN_HOLD,
        )
        return False


class Membership:
    def __init__(
        self,
        endpoint: Endpoint,
        self_state: SelfState,
        *,
        config: MembershipConfig | None = None,
        seeds: Iterable[tuple[str, int]] = (),
        rng: random.Random | None = None,
        wall_clock: Callable[[], float] = time.time,
    ):
        self.endpoint = endpoint
        self.identity = endpoint.identity
        self.node_id = endpoint.node_id
        self.mesh_tag = bytes.fromhex(endpoint.mesh.discovery_tag)
        self.config = config or MembershipConfig()
        self.self_state = self_state
        self.seeds = [Address(h, p) for h, p in seeds]
        self._initial_joins: list[asyncio.Task[Any]] = []
        self._introductions_until = 0.0  # (loop time) discovery may introduce peers till then
        self.rng = rng or random.Random()
        self.wall_clock = wall_clock
        self._loop = asyncio.get_running_loop()
        self.table = PeerTable(
            self.node_id,
            self._loop.time,
            max_members=self.config.max_members,
            tombstone_ttl=self.config.tombstone_ttl,
        )
        self.table.subscribe(self._on_table_change)
        self.incarnation = self_state.current.incarnation
        self.health = 0  # Lifeguard local health multiplier
        self._broadcasts = _Broadcasts()
        self._gossip_pending = asyncio.Event()  # set while broadcasts wait to go out
        self._probe_order: list[NodeId] = []
        self._probe_queued: set[NodeId] = set()  # what _probe_order holds, for O(1) lookups
        self._probe_seq = 0
        self._suspicions: dict[NodeId, asyncio.TimerHandle] = {}
        self._fetching: set[NodeId] = set()
        self._known_alive: set[NodeId] = set()
        self._reminded: collections.OrderedDict[NodeId, float] = collections.OrderedDict()
        self._join_failed: set[Address] = set()  # addresses a join through failed (said once)
        # addresses of dead members where another node answered: not retried for them
        self._taken: dict[NodeId, set[Address]] = {}
        self._twins = _TwinWatch(self._loop.time)
        self._fetch_slots = asyncio.Semaphore(self.config.fetch_concurrency)
        self._pushed: PeerState = self_state.current
        self._state_dirty = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._running = False
        self._left = False
        self._register_handlers()
        self.table.apply(self._alive_claim())
        self.table.apply_state(self_state.current)

    # ------------------------------------------------------------------ lifecycle

    def _register_handlers(self) -> None:
        handlers = self.endpoint.handlers
        handlers.on_request(Probe, self._on_probe)
        handlers.on_request(ProbeRequest, self._on_probe_request)
        handlers.on_message(Gossip, self._on_gossip)
        handlers.on_request(SyncRequest, self._on_sync)
        handlers.on_request(StateRequest, self._on_state_request)
        handlers.on_message(StateDelta, self._on_state_delta)

    async def start(self) -> None:
        self._running = True
        for loop_fn in (
            self._probe_loop,
            self._gossip_loop,
            self._sync_loop,
            self._reconnect_loop,
            self._push_loop,
            self._lag_loop,
            self._reap_loop,
        ):
            self._tasks.append(asyncio.create_task(loop_fn(), name=f"membership{loop_fn.__name__}"))
        self._initial_joins = [self._spawn(self.join(seed)) for seed in self.seeds]

    def expect_introductions(self, seconds: float) -> None:
        """Discovery (mDNS) may introduce peers in the next `seconds`: until then settled()
        does not take a view with nobody in it for the mesh's."""
        self._introductions_until = asyncio.get_running_loop().time() + seconds

    async def settled(self, timeout: float) -> None:
        """Until the first joins through the seeds are over, someone was met (or discovery
        had its time: expect_introductions) and the state of every live peer is known (at
        most `timeout` s): what a node decides from the mesh's state (elections) should wait
        for this, or a joiner acts as if it were alone."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        joins = [j for j in self._initial_joins if not j.done()]
        if joins:
            await asyncio.wait(joins, timeout=timeout)
        changed = asyncio.Event()

        def listener(member: Any, what: str) -> None:
            changed.set()

        self.table.subscribe(listener)
        try:
            while True:
                peers = self.table.live_peers()
                if peers and all(m.state is not None for m in peers):
                    return
                # nobody met yet: worth waiting only while discovery may introduce someone
                until = deadline if peers else min(deadline, self._introductions_until)
                remaining = until - loop.time()
                if remaining <= 0:
                    return
                changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):  # wait_for may swallow a cancel
                        await changed.wait()
        finally:
            self.table.unsubscribe(listener)

    async def leave(self, timeout: float = 1.0) -> None:
        """Tell every live member we are leaving (bounded wait), then stop."""
        if self._left:
            return
        self._left = True
        claim = make_claim(self.identity, self.mesh_tag, LEFT, self.node_id, self.incarnation)
        self.table.apply(claim)
        members = self.table.live_peers()
        if members:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await asyncio.gather(
                        *(self._send_to(m, Gossip([claim]), timeout) for m in members),
                        return_exceptions=True,
                    )
        await self.stop()

    async def stop(self) -> None:
        self._running = False
        await cancel_and_wait([*self._tasks, *self._background])
        self._tasks.clear()
        for timer in self._suspicions.values():
            timer.cancel()
        self._suspicions.clear()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # ------------------------------------------------------------------ our own claims/state

    def _alive_claim(self) -> Claim:
        return make_claim(
            self.identity,
            self.mesh_tag,
            ALIVE,
            self.node_id,
            self.incarnation,
            self.self_state.current.addresses,
        )

    def update_state(self, **changes: Any) -> None:
        """Change this node's published state; peers get a delta within a gossip interval."""
        if self.self_state.update(**changes):
            member = self.table.get(self.node_id)
            if member is not None:
                self.table.apply_state(self.self_state.current)
            self._state_dirty.set()

    def _refute(self, incarnation: int) -> None:
        if max(self.incarnation, incarnation) + 1 > MAX_INCARNATION:
            log.error("cannot refute a claim about us at incarnation %d: out of range", incarnation)
            return
        self.incarnation = max(self.incarnation, incarnation) + 1
        self.health = min(self.health + 1, self.config.max_health)
        claim = self._alive_claim()
        self.table.apply(claim)
        self._broadcast(claim)
        self.update_state(incarnation=self.incarnation)
        log.info("refuted a suspicion about us: now at incarnation %d", self.incarnation)

    def _broadcast(self, claim: Claim) -> None:
        self._broadcasts.add(claim)
        self._gossip_pending.set()

    # ------------------------------------------------------------------ claims in

    def accept_claims(self, claims: list[Claim], peer: NodeId) -> None:
        """Verify and apply claims that `peer` sent us itself (on a connection authenticated
        as it: a message, or its answer to ours); re-gossip what is news."""
        if len(claims) > self.config.max_members * 2:
            raise RequestFailed(ErrorCode.BAD_REQUEST, "too many claims")
        incarnation = self.incarnation
        for claim in claims:
            problem = shape_error(claim)
            if problem is None and not VERIFIER.verify(self.mesh_tag, claim):
                problem = "bad signature"
            if problem is not None:
                log.warning("rejected a claim from %s: %s", peer.short, problem)
                continue
            if claim.subject == self.node_id.key:
                self._about_us(claim)
                continue
            changed = self.table.apply(claim)
            if changed is not None:
                self._broadcast(claim)
        if self.incarnation != incarnation:
            # we refuted what `peer` told us: tell it first, for our gossip goes only to
            # members we hold live, and it may not be one (two sides of a split that forgot
            # each other)
            self._tell(peer, [self._alive_claim()])
        self._remind_if_gone(peer)

    async def accept_many_claims(self, claims: list[Claim], peer: NodeId) -> None:
        """accept_claims for a view exchange's claims (up to 2 * max_members): CLAIMS_PER_SLICE
        at a time, the event loop running between slices. 8192 fresh signatures take ~1.6 s
        to check, which would otherwise hold up every other task of the node (probes,
        answers, token streams) for that long."""
        if len(claims) > self.config.max_members * 2:
            raise RequestFailed(ErrorCode.BAD_REQUEST, "too many claims")
        for start in range(0, len(claims), CLAIMS_PER_SLICE):
            self.accept_claims(claims[start : start + CLAIMS_PER_SLICE], peer)
            if start + CLAIMS_PER_SLICE < len(claims):
                await asyncio.sleep(0)

    def _remind_if_gone(self, peer: NodeId) -> None:
        """`peer` spoke to us, so it runs. If our table holds it as dead or left, or forgot
        it, tell it (at most once a probe interval): at or below that incarnation it refutes,
        and its new alive claim lifts the tombstone everywhere. Once a tombstone is
        forgotten nobody else tells it, and every table refuses its alive claims at or below
        the forgotten incarnation: without this it would stay out for good."""
        member = self.table.get(peer)
        if member is not None and member.status not in TOMBSTONES:
            return
        forgotten = self.table.forgotten(peer)
        if member is None and forgotten is None:
            return  # a node we never met: nothing to tell
        now = self._loop.time()
        last = self._reminded.get(peer)
        if last is not None and now - last < self.config.probe_interval:
            return
        self._reminded[peer] = now
        self._reminded.move_to_end(peer)
        while len(self._reminded) > self.config.max_members:
            self._reminded.popitem(last=False)
        if member is not None:
            claim = member.status_claim  # its death (by whoever saw it) or its own leave
        else:  # the death we forgot, said again by us
            incarnation = min(forgotten or 0, MAX_ACCUSED)
            claim = make_claim(self.identity, self.mesh_tag, DEAD, peer, incarnation)
        self._tell(peer, [claim])

    def _tell(self, peer: NodeId, claims: list[Claim]) -> None:
        """Send claims straight to `peer`, on an open connection to it (none is dialed)."""
        conn = self.endpoint.connection_to(peer)
        if conn is not None and self._running:
            self._spawn(self._send_on(conn, Gossip(claims)))

    async def _send_on(self, conn: Connection, message: Any) -> None:
        with contextlib.suppress(TransportError, TimeoutError, OSError):
            await conn.send(message, timeout=self.config.request_timeout)

    def _about_us(self, claim: Claim) -> None:
        if self._left:
            return
        if claim.kind in (SUSPECT, DEAD) and claim.incarnation >= self.incarnation:
            self._refute(claim.incarnation)
        elif claim.kind in (ALIVE, LEFT) and claim.incarnation > self.incarnation:
            # our own old self (before a restart) spoke at a higher incarnation: go above it
            # (unless another process with our key keeps doing so: see _TwinWatch)
            if claim.kind == ALIVE and not self._twins.may_refute(claim, self.incarnation):
                return
            self._refute(claim.incarnation)

    def _on_table_change(self, member: Member, what: str) -> None:
        if what != STATUS or member.node_id == self.node_id:
            return
        if member.status == ALIVE and member.node_id not in self._known_alive:
            self._known_alive.add(member.node_id)
            log.info("node %s is alive (incarnation %d)", member.node_id.short, member.incarnation)
        elif member.status in (DEAD, LEFT):
            self._known_alive.discard(member.node_id)
        if member.status == SUSPECT:
            self._arm_suspicion(member)
        else:
            timer = self._suspicions.pop(member.node_id, None)
            if timer is not None:
                timer.cancel()
        if member.status == ALIVE:
            if member.node_id not in self._probe_queued:
                # new members go to a random place in the probe order (SWIM)
                self._probe_order.insert(
                    self.rng.randrange(len(self._probe_order) + 1), member.node_id
                )
                self._probe_queued.add(member.node_id)
            if member.state is None or member.state.incarnation < member.incarnation:
                self._fetch_state(member.node_id)
        if member.status in (DEAD, LEFT):
            log.info("node %s %s", member.node_id.short, STATUS_PHRASES[member.status])
            self.endpoint.close_peer(member.node_id, f"node declared {member.status}")

    # ------------------------------------------------------------------ suspicion

    def _suspicion_timeout(self, confirmations: int) -> float:
        cfg = self.config
        n = max(len(self.table.live_peers()) + 1, 2)
        low = max(cfg.suspicion_min, cfg.suspicion_mult * math.log10(n) * cfg.probe_interval)
        high = cfg.suspicion_max_factor * low
        expected = max(1, min(3, n - 2))
        if confirmations <= 0:
            return high
        fraction = math.log(confirmations + 1) / math.log(expected + 1)
        return max(low, high - (high - low) * min(fraction, 1.0))

    def _arm_suspicion(self, member: Member) -> None:
        old = self._suspicions.pop(member.node_id, None)
        if old is not None:
            old.cancel()
        confirmations = len(member.accusers - {self.node_id.key})
        deadline = member.status_since + self._suspicion_timeout(confirmations)
        self._suspicions[member.node_id] = self._loop.call_at(
            deadline, self._suspicion_expired, member.node_id, member.incarnation
        )

    def _suspicion_expired(self, node_id: NodeId, incarnation: int) -> None:
        self._suspicions.pop(node_id, None)
        member = self.table.get(node_id)
        if member is None or member.status != SUSPECT or member.incarnation != incarnation:
            return
        claim = make_claim(self.identity, self.mesh_tag, DEAD, node_id, incarnation)
        if self.table.apply(claim) is not None:
            self._broadcast(claim)
            self._spawn(self._gossip_round())  # a death is worth telling at once

    def _suspect(self, member: Member) -> None:
        claim = make_claim(
            self.identity, self.mesh_tag, SUSPECT, member.node_id, member.incarnation
        )
        if self.table.apply(claim) is not None:
            log.info("suspecting node %s (no answer to probes)", member.node_id.short)
            self._broadcast(claim)

    # ------------------------------------------------------------------ probing

    def _max_sends(self) -> int:
        return self.config.retransmit_mult * max(1, math.ceil(math.log2(len(self.table) + 1)))

    def _piggyback(self) -> list[Claim]:
        return self._broadcasts.take(self.config.max_claims_per_message, self._max_sends())

    def _next_probe_target(self) -> Member | None:
        for _ in range(len(self._probe_order) + 1):
            if not self._probe_order:
                live = [m.node_id for m in self.table.live_peers()]
                if not live:
                    return None
                self.rng.shuffle(live)
                self._probe_order = live
                self._probe_queued = set(live)
            node_id = self._probe_order.pop(0)
            self._probe_queued.discard(node_id)
            member = self.table.get(node_id)
            if member is not None and member.live:
                return member
        return None

    async def _probe_loop(self) -> None:
        while self._running:
            started = self._loop.time()
            interval = self.config.probe_interval * (1 + self.health)
            member = self._next_probe_target()
            if member is not None:
                try:
                    await self._probe(member, started + interval)
                except Exception:
                    log.exception("probe of %s failed unexpectedly", member.node_id.short)
            await asyncio.sleep(max(0.0, started + interval - self._loop.time()))

    async def _connect(self, member_id: NodeId, addresses: list[Address], timeout: float):
        """A connection to the member at one of its addresses, tried in turn within `timeout`
        (raises TransportError). Each address gets an equal share of the time left, so one
        that never answers (an interface of the node others cannot reach) leaves time for
        the next; one that fails at once leaves its share to those after it."""
        existing = self.endpoint.connection_to(member_id)
        if existing is not None:
            return existing
        last: Exception | None = None
        deadline = self._loop.time() + timeout
        for tried, address in enumerate(addresses):
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                break
            try:
                return await self.endpoint.connect(
                    (address.host, address.port),
                    expect=member_id,
                    timeout=remaining / (len(addresses) - tried),
                )
            except TransportError as exc:
                if isinstance(exc, HandshakeError) and another_node(exc.code, exc.reason):
                    self._taken.setdefault(member_id, set()).add(address)
                last = exc
        raise last or TimeoutError(f"no address of {member_id.short} answered")

    async def _ping(self, member_id: NodeId, addresses: list[Address], timeout: float) -> bool:
        """One direct probe. True when the member answered in time."""
        started = self._loop.time()
        conn = None
        try:
            async with asyncio.timeout(timeout):
                conn = await self._connect(member_id, addresses, timeout)
                self._probe_seq += 1
                probe = Probe(self._probe_seq, self.self_state.current.version, self._piggyback())
                ack = await conn.request(probe, timeout=timeout)
        except (TransportError, TimeoutError, OSError):
            if (
                conn is not None
                and conn.is_open
                and conn.last_heard <= started
                and self._loop.time() - started >= SILENT_RTTS * (conn.rtt() or 0.0)
            ):
                # silent all through the probe: perhaps a connection to a process that is
                # gone (the node may have restarted elsewhere); dial afresh next time
                conn.close(ErrorCode.NO_ERROR, "no answer to probes")
            return False
        if not isinstance(ack, ProbeAck):
            return False
        self.table.contact(member_id, self._loop.time() - started)
        self._heard_version(conn, ack.state_version)
        self.accept_claims(ack.claims, member_id)
        return True

    async def _probe(self, member: Member, deadline: float) -> None:
        probed = member.incarnation  # the table changes `member` in place meanwhile
        timeout = self.config.probe_timeout * (1 + self.health)
        if await self._ping(member.node_id, member.addresses, timeout):
            self.health = max(0, self.health - 1)
            return
        helpers = [
            m for m in self.table.peers(ALIVE) if m.node_id != member.node_id and m.addresses
        ]
        helpers = self.rng.sample(helpers, min(self.config.indirect_probes, len(helpers)))
        remaining = deadline - self._loop.time()
        if helpers and remaining > 0:
            request = ProbeRequest(member.node_id.key, member.addresses, self._piggyback())
            results = await asyncio.gather(
                *(self._ask_helper(h, request, remaining) for h in helpers)
            )
            if any(r is True for r in results):
                return
            missed = sum(1 for r in results if r is None)
            if missed:  # helpers that did not even answer: maybe our own network is bad
                self.health = min(self.health + 1, self.config.max_health)
        current = self.table.get(member.node_id)
        if current is not None and current.live and current.incarnation == probed:
            self.health = min(self.health + 1, self.config.max_health)
            self._suspect(current)

    async def _ask_helper(self, helper: Member, request: ProbeRequest, timeout: float):
        """True: the helper reached the target; False: it did not (nack); None: no answer."""
        try:
            async with asyncio.timeout(timeout):
                conn = await self._connect(helper.node_id, helper.addresses, timeout)
                result = await conn.request(request, timeout=timeout)
        except (TransportError, TimeoutError, OSError):
            return None
        if not isinstance(result, ProbeResult):
            return None
        self.accept_claims(result.claims, helper.node_id)
        return result.ok

    # ------------------------------------------------------------------ handlers

    def _on_probe(self, ctx: RequestContext, probe: Probe) -> ProbeAck:
        self._check_claim_count(probe.claims)
        self.table.contact(ctx.peer)
        self._heard_version(ctx.connection, probe.state_version)
        self.accept_claims(probe.claims, ctx.peer)
        return ProbeAck(probe.seq, self.self_state.current.version, self._piggyback())

    async def _on_probe_request(self, ctx: RequestContext, request: ProbeRequest) -> ProbeResult:
        self._check_claim_count(request.claims)
        self.accept_claims(request.claims, ctx.peer)
        if (
            len(request.target) != 32
            or len(request.addresses) > 8
            or any(address_error(a.host, a.port) for a in request.addresses)
        ):
            raise RequestFailed(ErrorCode.BAD_REQUEST, "bad probe target")
        target = NodeId(request.target)
        # 80% of a probe's timeout (Lifeguard): the "no" must reach the asker within the rest
        # of its probe slot, else it counts as no answer and raises the asker's health score
        timeout = NACK_SHARE * self.config.probe_timeout * (1 + self.health)
        ok = await self._ping(target, list(request.addresses), timeout)
        return ProbeResult(ok, self._piggyback())

    def _on_gossip(self, ctx: RequestContext, gossip: Gossip) -> None:
        if len(gossip.claims) > self.config.max_claims_per_message:
            log.warning(
                "dropped gossip from %s: %d claims (limit %d)",
                ctx.peer.short,
                len(gossip.claims),
                self.config.max_claims_per_message,
            )
            return
        self.accept_claims(gossip.claims, ctx.peer)

    async def _on_sync(self, ctx: RequestContext, request: SyncRequest) -> SyncReply:
        await self.accept_many_claims(request.claims, ctx.peer)
        digest = self.table.digest()
        if request.digest == digest:
            return SyncReply(digest, [])
        return SyncReply(digest, self.table.sync_claims())

    def _on_state_request(self, ctx: RequestContext, request: StateRequest) -> PeerState:
        return self.self_state.current

    def _on_state_delta(self, ctx: RequestContext, delta: StateDelta) -> None:
        if delta.node != ctx.peer.key:
            log.warning(
                "rejected a state change about %s sent by %s: a node speaks only for itself",
                NodeId(delta.node).short if len(delta.node) == 32 else "?",
                ctx.peer.short,
            )
            return
        problem = state_error(delta)
        if problem:
            log.warning("rejected a state change from %s: %s", ctx.peer.short, problem)
            return
        if self.table.apply_delta(delta) == "gap":
            self._fetch_state(ctx.peer)

    def _check_claim_count(self, claims: list[Claim]) -> None:
        if len(claims) > self.config.max_claims_per_message:
            raise RequestFailed(
                ErrorCode.BAD_REQUEST,
                f"{len(claims)} claims in one message (limit {self.config.max_claims_per_message})",
            )

    # ------------------------------------------------------------------ state exchange

    def _heard_version(self, conn: Connection, version: int) -> None:
        """A member told us (directly) its state version: fetch if ours is older. States are
        ordered by (incarnation, version), and a node's state is of the incarnation of its
        latest alive claim: one held from an older incarnation is older whatever its
        version (a node restarted with its clock behind publishes lower versions)."""
        if conn.peer is None:
            return
        member = self.table.get(conn.peer)
        if member is None or not member.live:
            return
        held = member.state
        current = member.alive_claim.incarnation if member.alive_claim else member.incarnation
        if held is None or (held.incarnation, held.version) < (current, version):
            self._fetch_state(conn.peer)

    def _fetch_state(self, node_id: NodeId) -> None:
        if node_id in self._fetching or not self._running:
            return
        self._fetching.add(node_id)
        self._spawn(self._fetch(node_id))

    async def _fetch(self, node_id: NodeId) -> None:
        try:
            async with self._fetch_slots:
                member = self.table.get(node_id)
                if member is None or not member.live:
                    return
                timeout = self.config.request_timeout
                conn = await self._connect(node_id, member.addresses, timeout)
                asked = self._loop.time()
                state = await conn.request(StateRequest(), timeout=timeout)
                self.table.contact(node_id, self._loop.time() - asked)
            if not isinstance(state, PeerState) or state.node != node_id.key:
                log.warning("node %s answered a state request with something else", node_id.short)
                return
            problem = state_error(state)
            if problem:
                log.warning("rejected the state of %s: %s", node_id.short, problem)
                return
            self.table.apply_state(state)
        except (TransportError, TimeoutError, OSError) as exc:
            log.debug("could not fetch the state of %s: %s", node_id.short, exc)
        finally:
            self._fetching.discard(node_id)

    async def _push_loop(self) -> None:
        """Send our state changes to every live member (coalescing bursts of changes)."""
        while self._running:
            await self._state_dirty.wait()
            self._state_dirty.clear()
            delta = self.self_state.delta_since(self._pushed)
            self._pushed = self.self_state.current
            slots = asyncio.Semaphore(self.config.push_concurrency)

            async def push(member: Member, delta: StateDelta = delta, slots=slots) -> None:
                async with slots:
                    await self._send_to(member, delta, self.config.request_timeout)

            await asyncio.gather(
                *(push(m) for m in self.table.live_peers()), return_exceptions=True
            )
            await asyncio.sleep(self.config.gossip_interval)  # bounded rate of pushes

    async def _send_to(self, member: Member, message: Any, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                conn = await self._connect(member.node_id, member.addresses, timeout)
                await conn.send(message, timeout=timeout)
            return True
        except (TransportError, TimeoutError, OSError):
            return False

    # ------------------------------------------------------------------ gossip & sync

    async def _gossip_round(self) -> None:
        if not len(self._broadcasts):
            return
        targets = self.table.peers(ALIVE, SUSPECT)
        targets = self.rng.sample(targets, min(self.config.gossip_fanout, len(targets)))
        sends = []
        for target in targets:
            claims = self._piggyback()
            if claims:
                sends.append(self._send_to(target, Gossip(claims), self.config.gossip_interval * 5))
        if sends:
            await asyncio.gather(*sends, return_exceptions=True)  # one bad target stops none

    async def _gossip_loop(self) -> None:
        """Idle until there is news, then push a round every gossip interval until sent."""
        while self._running:
            await self._gossip_pending.wait()
            await asyncio.sleep(self.config.gossip_interval)
            if not len(self._broadcasts):
                self._gossip_pending.clear()
                continue
            await self._gossip_round()

    async def sync_with(self, address: Address, expect: NodeId | None = None, push: bool = False):
        """Push-pull with one node: learn its view, and give it ours when they differ."""
        timeout = self.config.request_timeout
        if expect is not None:
            conn = await self._connect(expect, [address], timeout)
        else:
            conn = await self.endpoint.connect((address.host, address.port), timeout=timeout)
        return await self._exchange_views(conn, push)

    async def _exchange_views(self, conn: Connection, push: bool) -> NodeId:
        timeout = self.config.request_timeout
        claims = self.table.sync_claims() if push else []
        reply = await conn.request(SyncRequest(self.table.digest(), claims), timeout=timeout)
        if not isinstance(reply, SyncReply):
            raise RequestFailed(ErrorCode.UNEXPECTED_MESSAGE, "expected SyncReply")
        assert conn.peer is not None
        await self.accept_many_claims(reply.claims, conn.peer)
        if not push and reply.digest != self.table.digest():
            await conn.request(
                SyncRequest(self.table.digest(), self.table.sync_claims()), timeout=timeout
            )
        return conn.peer

    async def join(self, address: Address, expect: NodeId | None = None) -> bool:
        """Join through a node already in the mesh: full push-pull of views."""
        try:
            peer = await self.sync_with(address, expect, push=True)
        except (TransportError, TimeoutError, OSError) as exc:
            # the first failure through an address is a warning with a hint (a --peer with a
            # typo, a firewall, another mesh's id would otherwise pass unseen): then info
            first = address not in self._join_failed
            if first and len(self._join_failed) < self.config.max_members:
                self._join_failed.add(address)
            log.log(
                logging.WARNING if first else logging.INFO,
                "could not join through %s: %s%s",
                address,
                exc,
                _join_hint(exc) if first else "",
            )
            return False
        self._join_failed.discard(address)
        log.info("joined through %s (%s)", peer.short, address)
        return True

    async def _sync_loop(self) -> None:
        while self._running:
            await asyncio.sleep(self.config.sync_interval * (0.5 + self.rng.random()))
            members = [m for m in self.table.peers(ALIVE) if m.addresses]
            if not members:
                continue
            await self._try_sync(self.rng.choice(members))

    async def _try_sync(
        self, member: Member, push: bool = False, addresses: list[Address] | None = None
    ) -> None:
        """One background sync with `member` (at `addresses`, default all of its own): an
        unreachable one is no news, and a bug is logged, never allowed to end the loop that
        asked."""
        try:
            timeout = self.config.request_timeout
            addresses = member.addresses if addresses is None else addresses
            conn = await self._connect(member.node_id, addresses, timeout)
            await self._exchange_views(conn, push)
        except (TransportError, TimeoutError, OSError):
            pass
        except Exception:
            log.exception("sync with %s failed unexpectedly", member.node_id.short)

    async def _reconnect_loop(self) -> None:
        """While alone, retry the seeds; and now and then try a dead member: after a
        partition heals this is how the two sides find each other again."""
        while self._running:
            await asyncio.sleep(self.config.reconnect_interval * (0.5 + self.rng.random()))
            if not self.table.live_peers():
                for seed in self.seeds:
                    if await self.join(seed):
                        break
            dead = self._redialable_dead()
            if dead:
                member, addresses = self.rng.choice(dead)
                await self._try_sync(member, push=True, addresses=addresses)

    def _redialable_dead(self) -> list[tuple[Member, list[Address]]]:
        """The dead members worth a try, each with its addresses where no other node was
        found answering: a node that took a dead one's address (a restart with a new key, a
        new machine) is not dialled again and again for it until the tombstone goes."""
        dead = self.table.peers(DEAD)
        ids = {m.node_id for m in dead}
        for gone in [i for i in self._taken if i not in ids]:  # alive again, or forgotten
            del self._taken[gone]
        tries = []
        for member in dead:
            taken = self._taken.get(member.node_id, ())
            addresses = [a for a in member.addresses if a not in taken]
            if addresses:
                tries.append((member, addresses))
        return tries

    async def _lag_loop(self) -> None:
        """Lifeguard-style self-awareness: a late wake-up means our event loop is loaded."""
        interval = self.config.lag_interval
        while self._running and interval > 0:
            before = self._loop.time()
            await asyncio.sleep(interval)
            lag = self._loop.time() - before - interval
            if lag > self.config.probe_timeout / 2:
                self.health = min(self.health + 1, self.config.max_health)

    async def _reap_loop(self) -> None:
        while self._running:
            await asyncio.sleep(min(self.config.tombstone_ttl / 10, 60.0))
            for member in self.table.reap():
                log.info("forgot node %s (%s long enough)", member.node_id.short, member.status)


def _join_hint(exc: BaseException) -> str:
    """What to check when a join through an address fails (for the first warning)."""
    if isinstance(exc, HandshakeError) and exc.code == ErrorCode.WRONG_MESH:
        return (
            " (the node there is in another mesh: compare the mesh ids, e.g. the files given "
            "with --mesh-id-file)"
        )
    if isinstance(exc, HandshakeError):
        return ""
    if isinstance(exc, OSError) and not isinstance(exc, TimeoutError):
        return " (check the address: a name that does not resolve, a bad port?)"
    return (
        " (is a node running there, and does UDP reach its port? a firewall drops QUIC "
        "silently; retrying)"
    )
