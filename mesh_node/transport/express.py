"""Express lanes: sealed UDP datagrams for short calls that worker threads make and answer
themselves, without the event loops.

A decode step's expert call is about 1 ms of compute. Over QUIC it cost 2.5 ms here: aioquic's
per-packet Python on both sides (~0.9 ms) and four hand-offs between the engine's and the
expert service's worker threads and the two event loops (~0.5 ms). On a lane the host's engine
thread seals the call into one UDP datagram and sends it; on the peer a lane thread, blocked
on its socket, checks it, computes and sends the answer back; the engine thread reads it.

* A lane is opened over an authenticated QUIC connection: the caller sends `ExpressOpen` with
  32 fresh random bytes (the lane secret, protected by the connection's TLS), the answerer
  grants `ExpressLane` (an 8-byte lane id it picks and its lane socket's UDP port). Both
  derive two AES-256-GCM keys: HKDF-SHA256(secret, salt = lane id, info = "express call" /
  "express answer"). The lane belongs to the node authenticated on that connection and
  closes with it. The caller sends one Ping on a new lane first (`probe_lane`) and uses the
  lane only once that is answered; the lane's numbering goes on from there.
* A datagram is `lane (8) | seq u64be (8) | AES-256-GCM(key, nonce = 4 zero bytes | seq,
  aad = lane | seq)(call u32be | frame)`, the frame as on a stream (one message: a request
  one way; its answer or an `Error` the other). Each direction numbers its datagrams 1, 2, ...;
  a side accepts a datagram only above the last number it accepted on that lane and drops,
  silently, anything else or anything that does not authenticate.
* Calls must be idempotent. The caller sends a call again (a new datagram, same call id) when
  no answer came within its retransmission timeout (4 x the lane's smoothed call time, at
  least `min_rto`), doubling it each time; after `attempts` datagrams, and no sooner than
  `min_wait` seconds (a busy answerer is late, not gone), it gives up (`ExpressFailed`) and
  goes back to QUIC. The answerer keeps the last answer of each lane and sends it again for
  a copy of that call (same call id, same plaintext) instead of computing it again.
* One datagram per call and per answer, at most `MAX_DATAGRAM` bytes: bigger calls go over
  QUIC, and an answer that would not fit is answered `Error{FRAME_TOO_LARGE}`. Datagrams
  larger than the path's MTU are fragmented by IP (the sockets never set don't-fragment).

Each side runs one thread per socket: answers are computed one at a time, in order.

Waiting for an answer, the calling thread first polls its socket (non-blocking reads, no
sleep) for up to `poll` seconds after the call went out, when the lane's answers usually come
within that (smoothed call time at most `poll`), and only then sleeps on it. A short call's
answer is then read the moment it lands: no sleep and wake-up of the thread in between, and
its caches stay warm. That is CPU the calling thread spends waiting, bounded by `poll` per
call; lanes whose calls take longer sleep at once, as before. (Three nodes sharing a 2-core
machine, a 2 ms poll against none: decode +22% tokens/s for the built-in model, +11% for an
OLMoE-sized one; benchmarks/RESULTS.md.)
"""

from __future__ import annotations

import collections
import contextlib
import ipaddress
import itertools
import logging
import os
import select
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from mesh_node.identity import NodeId
from mesh_node.transport.addresses import calling_address, port_error
from mesh_node.transport.errors import (
    ErrorCode,
    ProtocolError,
    RemoteError,
    RequestFailed,
    TransportError,
)
from mesh_node.transport.frames import FrameLimits, frame_parts, single_frame
from mesh_node.transport.messages import Error, ExpressLane, ExpressOpen, Ping
from mesh_node.transport.schema import Registry

log = logging.getLogger("mesh_node.transport.express")

HEADER = struct.Struct(">8sQ")  # lane id, sequence number
CALL = struct.Struct(">I")  # call id, first in the sealed plaintext
TAG_SIZE = 16
SECRET_SIZE = 32
MAX_DATAGRAM = 65000  # a lane datagram, header and tag included (IPv4 UDP allows 65507)
MAX_PLAINTEXT = MAX_DATAGRAM - HEADER.size - TAG_SIZE
READS_PER_WAKE = 64  # datagrams a waiting caller reads from one socket before looking up
_IP_MTU_DISCOVER = 10  # <linux/in.h> (Python's socket module lacks the name)
_IP_PMTUDISC_DONT = 0  # never set don't-fragment: IP fragments datagrams over the path MTU


class ExpressFailed(TransportError):
    """No answer came on the lane (datagrams lost, the peer gone or its lane closed): make the
    call over QUIC instead."""


def lane_key_bytes(secret: bytes, lane: bytes) -> tuple[bytes, bytes]:
    """(call key, answer key) of a lane: HKDF-SHA256(secret, salt = lane id)."""
    if len(secret) != SECRET_SIZE or len(lane) != HEADER.size - 8:
        raise ValueError("a lane needs a 32-byte secret and an 8-byte id")

    def key(info: bytes) -> bytes:
        return HKDF(SHA256(), length=32, salt=lane, info=info).derive(secret)

    return key(b"express call"), key(b"express answer")


def lane_keys(secret: bytes, lane: bytes) -> tuple[AESGCM, AESGCM]:
    """The lane's two AES-256-GCM keys, ready to seal and unseal."""
    call_key, answer_key = lane_key_bytes(secret, lane)
    return AESGCM(call_key), AESGCM(answer_key)


def seal(aead: AESGCM, lane: bytes, seq: int, plaintext: bytes) -> bytes:
    header = HEADER.pack(lane, seq)
    return header + aead.encrypt(_nonce(seq), plaintext, header)


def unseal(aead: AESGCM, datagram: bytes) -> bytes | None:
    """The plaintext, or None when the datagram does not authenticate."""
    header = datagram[: HEADER.size]
    try:
        return aead.decrypt(_nonce(HEADER.unpack(header)[1]), datagram[HEADER.size :], header)
    except InvalidTag:
        return None


def accept(aead: AESGCM, lane: Any, datagram: bytes) -> bytes | None:
    """The plaintext of a datagram on `lane` (sealed with `aead`), or None to drop it: too short
    to hold a call id, not authentic, or not numbered above the last one accepted (`lane.seen`,
    which it then becomes)."""
    if len(datagram) < HEADER.size + TAG_SIZE + CALL.size:
        return None
    seq = HEADER.unpack_from(datagram)[1]
    if seq <= lane.seen:  # a copy or a late one: not worth opening
        return None
    plain = unseal(aead, datagram)
    if plain is not None:
        lane.seen = seq
    return plain


def _nonce(seq: int) -> bytes:
    return b"\0\0\0\0" + seq.to_bytes(8, "big")


def plaintext(registry: Registry, call_id: int, message: Any) -> bytes:
    """`call u32be | frame` of one message."""
    return b"".join([CALL.pack(call_id), *frame_parts(registry.encode(message))])


def read_plaintext(registry: Registry, limits: FrameLimits, data: bytes) -> tuple[int, Any]:
    """(call id, message) of a plaintext; ProtocolError when it is not one whole frame."""
    if len(data) < CALL.size:
        raise ProtocolError(ErrorCode.TRUNCATED_FRAME, "a lane datagram without a call id")
    frame = single_frame(data[CALL.size :], limits)
    if frame is None:
        raise ProtocolError(
            ErrorCode.MALFORMED_FRAME, "a lane datagram must carry exactly one whole frame"
        )
    return CALL.unpack_from(data)[0], registry.decode(frame[0], memoryview(frame[1]))


def _udp_socket(family: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    if sys.platform.startswith("linux"):
        # an IPv6 socket that is not IPv6-only also sends IPv4 (to mapped addresses): that
        # IPv4 must not set don't-fragment either (IPv6 itself has no such bit)
        sock.setsockopt(socket.IPPROTO_IP, _IP_MTU_DISCOVER, _IP_PMTUDISC_DONT)
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        sock.setsockopt(socket.SOL_SOCKET, option, 1 << 20)
    return sock


def _family_of(host: str) -> tuple[int, str]:
    """(address family, address) to reach `host`; an IPv4-mapped IPv6 address as IPv4."""
    ip = ipaddress.ip_address(host.split("%")[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return socket.AF_INET, str(ip.ipv4_mapped)
    return (socket.AF_INET6 if ip.version == 6 else socket.AF_INET), host


# ---------------------------------------------------------------- the answering side
# (peer, message) -> answer message; raise RequestFailed to answer with an Error
LaneHandler = Callable[[NodeId, Any], Any]


@dataclass
class _ServedLane:
    peer: NodeId
    owner: object  # the connection that opened the lane
    calls: AESGCM
    answers: AESGCM
    seen: int = 0  # last sequence number accepted
    sent: int = 0
    # (call id, hash of the call's plaintext, answer plaintext) of the last call
    answered: tuple[int, int, bytes] | None = None


class ExpressServer:
    """Grants lanes (`attach` it to an endpoint) and answers their calls on its own thread with
    the handlers given to `on_call`. Thread-safe: lanes open and close from the event loop."""

    def __init__(
        self,
        registry: Registry,
        *,
        host: str = "0.0.0.0",
        max_lanes: int = 256,
        max_lanes_per_owner: int = 16,
        limits: FrameLimits | None = None,
    ):
        self.registry = registry
        self.host = host
        self.max_lanes = max_lanes
        self.max_lanes_per_owner = max_lanes_per_owner  # per connection: one cannot evict all
        self.limits = limits or FrameLimits()
        self._handlers: dict[type, LaneHandler] = {}
        self._lanes: collections.OrderedDict[bytes, _ServedLane] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self.answered = 0  # calls answered (copies of a call included)
        self.dropped = 0  # datagrams dropped: unknown lane, not authentic, replayed, too short

    def on_call(self, message_type: type, fn: LaneHandler) -> None:
        self._handlers[message_type] = fn

    def attach(self, endpoint: Any) -> None:
        """Grant lanes on `endpoint`'s connections and close them with those connections."""
        endpoint.handlers.on_request(ExpressOpen, self._open)
        endpoint.on_disconnected.append(self.close_lanes_of)

    @property
    def port(self) -> int:
        if self._sock is None:
            raise RuntimeError("the lane socket is not open: start() first")
        return self._sock.getsockname()[1]

    @property
    def lanes(self) -> int:
        return len(self._lanes)

    def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = _udp_socket(family)
        try:
            sock.bind((self.host, 0))
        except OSError:
            sock.close()
            raise
        sock.settimeout(0.25)  # how soon the thread sees close()
        self._sock = sock
        self._thread = threading.Thread(target=self._run, name="mesh-express", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closed = True
        with self._lock:
            self._lanes.clear()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        if self._sock is not None:
            self._sock.close()

    def open_lane(self, peer: NodeId, owner: object, secret: bytes) -> bytes:
        """A new lane for `peer` (on the connection `owner`): its id."""
        lane = os.urandom(8)
        calls, answers = lane_keys(secret, lane)
        with self._lock:
            self._lanes[lane] = _ServedLane(peer, owner, calls, answers)
            owned = [k for k, v in self._lanes.items() if v.owner is owner]  # oldest use first
            for old in owned[: max(0, len(owned) - self.max_lanes_per_owner)]:
                del self._lanes[old]  # the connection's own least recently used goes
            while len(self._lanes) > self.max_lanes:  # the least recently used goes
                self._lanes.popitem(last=False)
        return lane

    def close_lanes_of(self, owner: object) -> None:
        with self._lock:
            for lane in [k for k, v in self._lanes.items() if v.owner is owner]:
                del self._lanes[lane]

    def _open(self, ctx: Any, request: ExpressOpen) -> ExpressLane:
        if self._sock is None or self._closed:
            raise RequestFailed(ErrorCode.UNAVAILABLE, "this node's lane socket is not open")
        if len(request.secret) != SECRET_SIZE:
            raise RequestFailed(ErrorCode.BAD_REQUEST, "a lane secret is 32 bytes")
        return ExpressLane(self.open_lane(ctx.peer, ctx.connection, request.secret), self.port)

    def _run(self) -> None:
        assert self._sock is not None
        while not self._closed:
            try:
                data, address = self._sock.recvfrom(MAX_DATAGRAM + 1)
            except TimeoutError:
                continue
            except OSError:
                if self._closed:
                    return
                log.exception("lane socket failed")
                time.sleep(0.05)  # a transient error (e.g. ICMP unreachable): go on
                continue
            try:
                self._datagram(data, address)
            except Exception:
                log.exception("answering a lane datagram failed")

    def _datagram(self, data: bytes, address: Any) -> None:
        lane_id = data[:8]
        with self._lock:
            lane = self._lanes.get(lane_id)
        plain = None if lane is None else accept(lane.calls, lane, data)
        if lane is None or plain is None:
            self.dropped += 1
            return
        with self._lock:  # recently used: only a datagram that authenticates says so
            if lane_id in self._lanes:
                self._lanes.move_to_end(lane_id)
        call_id = CALL.unpack_from(plain)[0]
        digest = hash(plain)
        if lane.answered is not None and lane.answered[:2] == (call_id, digest):
            answer = lane.answered[2]  # a copy of the last call: its answer again
        else:
            answer = self._answer(lane.peer, call_id, plain)
            lane.answered = (call_id, digest, answer)
        lane.sent += 1
        self.answered += 1
        assert self._sock is not None
        try:
            self._sock.sendto(seal(lane.answers, lane_id, lane.sent, answer), address)
        except OSError as exc:  # the caller retries, or goes over QUIC
            log.debug("lane answer to %s not sent: %s", address, exc)

    def _answer(self, peer: NodeId, call_id: int, plain: bytes) -> bytes:
        try:
            _, message = read_plaintext(self.registry, self.limits, plain)
            fn = self._handlers.get(type(message))
            if fn is None:
                raise RequestFailed(
                    ErrorCode.NOT_SUPPORTED, f"{type(message).__name__} is not served on lanes"
                )
            reply = fn(peer, message)
        except RequestFailed as exc:
            reply = Error(exc.code, exc.message, exc.reason)
        except ProtocolError as exc:
            reply = Error(exc.code, exc.message)
        except Exception as exc:
            log.exception("lane call from %s failed", peer.short)
            reply = Error(ErrorCode.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
        answer = plaintext(self.registry, call_id, reply)
        if len(answer) > MAX_PLAINTEXT:
            answer = plaintext(
                self.registry,
                call_id,
                Error(ErrorCode.FRAME_TOO_LARGE, "the answer does not fit a lane datagram"),
            )
        return answer


# ---------------------------------------------------------------- the calling side
@dataclass
class _CallingLane:
    lane: bytes
    address: tuple[str, int]
    local: tuple[int, str]  # (family, address) of the socket it calls from (calling_address)
    calls: AESGCM
    answers: AESGCM
    sent: int = 0
    seen: int = 0
    srtt: float | None = None  # smoothed time from a call to its answer


@dataclass(frozen=True)
class LaneState:
    """Where a lane's numbering stands: a caller that takes the lane over goes on from here,
    so that no sequence number is ever sealed twice under its keys."""

    sent: int = 0
    seen: int = 0
    srtt: float | None = None


def probe_lane(
    registry: Registry,
    address: tuple[str, int],
    lane: bytes,
    secret: bytes,
    timeout: float = 2.0,
) -> LaneState:
    """Send one Ping on a newly granted lane, from a socket of its own, and wait for the answer
    (blocking; any authentic answer will do: a Pong, or an Error from an answerer that serves
    no Ping on lanes). Returns where the lane's numbering stands, for `ExpressClient.add`;
    ExpressFailed when no answer came (a firewall in the way, or an address family the
    answerer does not listen on): then the lane is not worth using."""
    probe = ExpressClient(registry)
    probe._ids = itertools.count(0)  # call id 0: a caller's own ids start at 1, never in a row
    try:
        probe.add("probe", address, lane, secret)
        call = probe.call("probe", Ping(0))
        assert call is not None  # a Ping always fits one datagram
        with contextlib.suppress(RemoteError):  # an answer all the same: the lane works
            probe.result(call, timeout)
        state = probe._lanes["probe"]
        return LaneState(state.sent, state.seen, state.srtt)
    finally:
        probe.close()


@dataclass(eq=False)
class ExpressCall:
    """A call in flight on a lane (`ExpressClient.call`); `ExpressClient.result` waits for it."""

    key: Hashable
    lane: _CallingLane
    call_id: int
    plain: bytes
    rto: float
    sent_at: float = 0.0
    first_sent: float = 0.0
    attempts: int = 0
    answer: Any = None
    error: Exception | None = field(default=None, repr=False)


class ExpressClient:
    """Lanes to peers (keyed by anything hashable, e.g. a node id) and the calls on them.
    `add`/`drop` may come from any thread; `call`, `result` and `cancel` from one thread at a
    time (the engine's)."""

    def __init__(
        self,
        registry: Registry,
        *,
        attempts: int = 4,
        min_wait: float = 0.5,
        first_rto: float = 0.1,
        min_rto: float = 0.01,
        max_rto: float = 1.0,
        poll: float = 0.002,
        limits: FrameLimits | None = None,
    ):
        self.registry = registry
        self.poll = poll  # seconds to poll for a quick lane's answer before sleeping
        self.attempts = attempts
        self.min_wait = min_wait  # a call gives up no sooner (a busy answerer is not a lost one)
        self.first_rto = first_rto
        self.min_rto = min_rto
        self.max_rto = max_rto
        self.limits = limits or FrameLimits()
        self._lanes: dict[Hashable, _CallingLane] = {}
        self._by_id: dict[bytes, _CallingLane] = {}
        self._sockets: dict[tuple[int, str], socket.socket] = {}  # by (family, bound address)
        self._lock = threading.Lock()
        self._closed = False
        self._pending: dict[tuple[bytes, int], ExpressCall] = {}
        self._ids = itertools.count(1)
        self.resent = 0  # datagrams sent again
        self.polled = 0  # waits that read datagrams while polling, before sleeping
        self.dropped = 0  # datagrams dropped: unknown lane, not authentic, replayed, late

    def add(
        self,
        key: Hashable,
        address: tuple[str, int],
        lane: bytes,
        secret: bytes,
        start: LaneState | None = None,
    ) -> None:
        """A lane to `key` at `address`, its numbering going on from `start` (a probe's, see
        `probe_lane`); ValueError for a port outside 1-65535 or a lane id not 8 bytes long,
        RuntimeError once the client is closed (it opens no socket again)."""
        problem = port_error(address[1])
        if problem is not None:
            raise ValueError(f"a lane's {problem}")
        if len(lane) != 8:
            raise ValueError(f"a lane id is 8 bytes, got {len(lane)}")
        family, host = _family_of(address[0])
        local = (family, calling_address(family, host))
        calls, answers = lane_keys(secret, lane)
        with self._lock:
            if self._closed:
                raise RuntimeError("the express client is closed")
            if local not in self._sockets:
                sock = _udp_socket(family)
                sock.bind((local[1], 0))
                sock.setblocking(False)
                self._sockets[local] = sock
            old = self._lanes.get(key)
            if old is not None:
                self._by_id.pop(old.lane, None)
            state = start or LaneState()
            self._lanes[key] = _CallingLane(
                lane, (host, address[1]), local, calls, answers, state.sent, state.seen, state.srtt
            )
            self._by_id[lane] = self._lanes[key]

    def drop(self, key: Hashable, lane_id: bytes | None = None) -> bool:
        """Forget the lane to `key`; with `lane_id`, only if it is still that lane. False when
        a lane opened since stays, True when `key` has no lane now."""
        with self._lock:
            lane = self._lanes.get(key)
            if lane is None:
                return True
            if lane_id is not None and lane.lane != lane_id:
                return False
            del self._lanes[key]
            self._by_id.pop(lane.lane, None)
            return True

    def __contains__(self, key: Hashable) -> bool:
        return key in self._lanes

    @property
    def closed(self) -> bool:
        return self._closed

    def lane_id(self, key: Hashable) -> bytes | None:
        """The id of the lane to `key` now, None when there is none."""
        lane = self._lanes.get(key)
        return None if lane is None else lane.lane

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lanes.clear()
            self._by_id.clear()
            sockets, self._sockets = list(self._sockets.values()), {}
        for sock in sockets:
            sock.close()

    def call(self, key: Hashable, message: Any) -> ExpressCall | None:
        """Send `message` on the lane to `key`; None when there is no lane or it does not fit
        one datagram (call over QUIC then)."""
        lane = self._lanes.get(key)
        if lane is None:
            return None
        call_id = next(self._ids) & 0xFFFFFFFF
        plain = plaintext(self.registry, call_id, message)
        if len(plain) > MAX_PLAINTEXT:
            return None
        rto = self.first_rto if lane.srtt is None else 4 * lane.srtt
        call = ExpressCall(key, lane, call_id, plain, min(max(rto, self.min_rto), self.max_rto))
        self._send(call)  # before it is pending: only this thread reads the answers
        if call.error is None:
            self._pending[(lane.lane, call_id)] = call
        return call

    def cancel(self, call: ExpressCall) -> None:
        self._pending.pop((call.lane.lane, call.call_id), None)

    def result(self, call: ExpressCall, timeout: float) -> Any:
        """The answer; RemoteError when the peer answered an Error, ExpressFailed when none came
        (after every attempt and at least `min_wait` seconds, or `timeout` seconds)."""
        deadline = time.monotonic() + timeout
        while call.answer is None and call.error is None:
            now = time.monotonic()
            if now >= deadline:  # first: datagrams arriving all the time cannot hold a call
                call.error = ExpressFailed(f"no answer on the lane within {timeout:.3g}s")
                break
            if now >= call.sent_at + call.rto:
                self._read(list(self._sockets.values()))
                if call.answer is not None or call.error is not None:
                    continue  # its answer was among what arrived: no copy for it then
                if call.attempts >= self.attempts and now - call.first_sent >= self.min_wait:
                    call.error = ExpressFailed(
                        f"no answer on the lane after {call.attempts} datagrams"
                    )
                    break
                call.rto = min(call.rto * 2, self.max_rto)
                self.resent += 1
                self._send(call)
                continue
            self._receive(
                min(call.sent_at + call.rto, deadline) - now,
                min(self.poll_until(call), deadline),
            )
        self.cancel(call)
        if call.error is not None:
            raise call.error
        if isinstance(call.answer, Error):
            raise RemoteError(call.answer.code, call.answer.message, call.answer.reason)
        return call.answer

    def poll_until(self, call: ExpressCall) -> float:
        """Until when (monotonic) to poll for the call's answer before sleeping: `poll` after
        it was sent when the lane's answers come within `poll` (or none came yet), else 0."""
        srtt = call.lane.srtt
        if self.poll > 0 and (srtt is None or srtt <= self.poll):
            return call.sent_at + self.poll
        return 0.0

    def _send(self, call: ExpressCall) -> None:
        lane = call.lane
        lane.sent += 1
        call.attempts += 1
        call.sent_at = time.monotonic()
        if call.attempts == 1:
            call.first_sent = call.sent_at
        sock = self._sockets.get(lane.local)
        try:
            if sock is None:
                raise OSError("the lane sockets are closed")
            sock.sendto(seal(lane.calls, lane.lane, lane.sent, call.plain), lane.address)
        except (OSError, OverflowError, ValueError) as exc:  # e.g. no route: not this way
            call.error = ExpressFailed(f"lane datagram not sent: {exc}")

    def _receive(self, wait: float, poll_until: float = 0.0) -> None:
        """Read what has arrived: polling until `poll_until` (monotonic) while nothing has,
        then sleeping at most `wait` seconds for something."""
        sockets = list(self._sockets.values())
        if not sockets:
            time.sleep(max(wait, 0.0))
            return
        while time.monotonic() < poll_until:
            if self._read(sockets):
                self.polled += 1
                return
        poller = select.poll()
        for sock in sockets:
            poller.register(sock, select.POLLIN)
        if poller.poll(max(wait, 0.0) * 1000.0):
            self._read(sockets)

    def _read(self, sockets: list[socket.socket]) -> bool:
        """Handle the datagrams waiting on these (non-blocking) sockets, at most
        READS_PER_WAKE from each; whether there was any."""
        got = False
        for sock in sockets:
            for _ in range(READS_PER_WAKE):  # bounded: a flood cannot hold the caller
                try:
                    data = sock.recv(MAX_DATAGRAM + 1)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:  # e.g. ICMP port unreachable from an earlier send
                    break
                got = True
                self._datagram(data)
        return got

    def _datagram(self, data: bytes) -> None:
        lane = self._by_id.get(data[:8])
        plain = None if lane is None else accept(lane.answers, lane, data)
        if lane is None or plain is None:
            self.dropped += 1
            return
        call = self._pending.pop((lane.lane, CALL.unpack_from(plain)[0]), None)
        if call is None:  # an answer to a copy of a call already answered, or abandoned
            self.dropped += 1
            return
        try:
            call.answer = read_plaintext(self.registry, self.limits, plain)[1]
        except ProtocolError as exc:
            call.error = exc
            return
        if call.attempts == 1:  # Karn: time only calls sent once
            took = time.monotonic() - call.first_sent
            lane.srtt = took if lane.srtt is None else 0.875 * lane.srtt + 0.125 * took
