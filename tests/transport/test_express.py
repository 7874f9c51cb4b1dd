"""Express lanes (transport/express.py): sealed UDP calls between threads, over real sockets on
loopback, with a relay in between that loses chosen datagrams; lanes granted over real QUIC."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh_node.identity import NodeIdentity
from mesh_node.transport.addresses import calling_address
from mesh_node.transport.errors import ErrorCode, ProtocolError, RemoteError, RequestFailed
from mesh_node.transport.express import (
    MAX_PLAINTEXT,
    READS_PER_WAKE,
    ExpressClient,
    ExpressFailed,
    ExpressServer,
    lane_key_bytes,
    plaintext,
    probe_lane,
    read_plaintext,
    seal,
    unseal,
)
from mesh_node.transport.frames import FrameLimits
from mesh_node.transport.messages import ExpressLane, ExpressOpen, Ping, Pong
from tests.conditions import until
from tests.transport.conftest import REGISTRY, Crash, Echo, Fail, Unhandled, quic_pair

VECTOR = Path(__file__).parents[2] / "proto" / "vectors" / "lanes" / "datagram.json"
PEER = NodeIdentity.generate().node_id


class Relay:
    """A UDP relay between a lane's caller and its server that drops the datagrams `drop`
    picks: drop(direction, n) with direction "call" or "answer" and n counting from 1."""

    def __init__(self, target: tuple[str, int], drop=lambda direction, n: False):
        self.target = target
        self.drop = drop
        self.counts = {"call": 0, "answer": 0}
        self.seen: list[bytes] = []  # call datagrams, as sent
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.address = self.sock.getsockname()
        self.caller = None
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while self.running:
            try:
                data, source = self.sock.recvfrom(70000)
            except TimeoutError:
                continue
            direction = "answer" if source == self.target else "call"
            if direction == "call":
                self.caller = source
                self.seen.append(data)
            self.counts[direction] += 1
            if not self.drop(direction, self.counts[direction]):
                self.sock.sendto(data, self.target if direction == "call" else self.caller)

    def close(self):
        self.running = False
        self.thread.join(timeout=2)
        self.sock.close()


class Lane:
    """A lane server with test handlers, a client, and (optionally) a relay between them."""

    def __init__(self, drop=None, **client_options):
        self.handled = 0
        self.delay = 0.0  # seconds each Ping keeps the server busy
        self.server = ExpressServer(REGISTRY, host="127.0.0.1")
        self.server.on_call(Ping, self.ping)
        self.server.on_call(Echo, lambda peer, msg: Echo(msg.text * 2))
        self.server.on_call(Fail, self.fail)
        self.server.on_call(Crash, lambda peer, msg: 1 / 0)
        self.server.start()
        self.secret = os.urandom(32)
        self.lane = self.server.open_lane(PEER, "connection", self.secret)
        target = ("127.0.0.1", self.server.port)
        self.relay = Relay(target, drop) if drop is not None else None
        self.client = ExpressClient(REGISTRY, **client_options)
        address = self.relay.address if self.relay else target
        self.client.add("peer", address, self.lane, self.secret)

    def ping(self, peer, msg):
        assert peer == PEER
        self.handled += 1
        time.sleep(self.delay)
        return Pong(msg.seq)

    def fail(self, peer, msg):
        raise RequestFailed(ErrorCode(msg.code), "asked to fail", reason="asked")

    def call(self, message, timeout=2.0):
        call = self.client.call("peer", message)
        assert call is not None
        return self.client.result(call, timeout)

    def close(self):
        self.client.close()
        if self.relay:
            self.relay.close()
        self.server.close()


@pytest.fixture
def lane():
    made = []

    def make(drop=None, **options):
        made.append(Lane(drop, **options))
        return made[-1]

    yield make
    for each in made:
        each.close()


def test_calls_and_answers_cross_a_lane_one_datagram_each(lane):
    pair = lane(drop=lambda direction, n: False)
    for seq in range(50):
        assert pair.call(Ping(seq)) == Pong(seq)
    assert pair.handled == 50
    assert pair.relay.counts == {"call": 50, "answer": 50}
    assert pair.client.resent == 0 and pair.server.dropped == 0


def test_a_lost_call_is_sent_again(lane):
    pair = lane(drop=lambda direction, n: direction == "call" and n == 1)
    assert pair.call(Ping(7)) == Pong(7)
    assert pair.client.resent == 1 and pair.handled == 1


def test_a_lost_answer_is_sent_again_without_computing_the_call_again(lane):
    pair = lane(drop=lambda direction, n: direction == "answer" and n == 1)
    assert pair.call(Ping(7)) == Pong(7)
    assert pair.client.resent == 1
    assert pair.handled == 1  # the copy was answered from the kept answer
    assert pair.server.answered == 2
    assert pair.call(Ping(8)) == Pong(8) and pair.handled == 2  # the next call is computed


def test_a_peer_that_never_answers_fails_the_call_after_its_attempts(lane):
    pair = lane(drop=lambda direction, n: True, attempts=3, first_rto=0.02, min_wait=0.0)
    started = time.monotonic()
    with pytest.raises(ExpressFailed, match="after 3 datagrams"):
        pair.call(Ping(1))
    assert pair.relay.counts["call"] == 3
    assert time.monotonic() - started < 1.0  # 20 + 40 + 80 ms of waiting
    # the timeout given to result() bounds the wait too
    call = pair.client.call("peer", Ping(2))
    with pytest.raises(ExpressFailed, match="within"):
        pair.client.result(call, 0.03)
    # and a call gives up no sooner than min_wait, however many datagrams that takes
    slow = lane(drop=lambda direction, n: True, attempts=3, first_rto=0.02, min_wait=0.3)
    started = time.monotonic()
    with pytest.raises(ExpressFailed, match="no answer on the lane after"):
        slow.call(Ping(3))
    assert time.monotonic() - started >= 0.3
    assert slow.relay.counts["call"] >= 3


def test_a_busy_answerer_is_waited_for_and_computes_the_call_once(lane):
    def busy(min_wait):
        # a quick lane: timeouts of 5-20 ms (max_rto caps them however slowly the first
        # call went on a loaded machine), so 4 datagrams go out within 80 ms
        pair = lane(first_rto=0.005, min_rto=0.005, max_rto=0.02, attempts=4, min_wait=min_wait)
        assert pair.call(Ping(0)) == Pong(0)
        pair.delay = 0.4  # then the server is busy (say, another host's prefill)
        return pair

    patient = busy(1.0)
    assert patient.call(Ping(1)) == Pong(1)  # copies came meanwhile, answered from the kept one
    assert patient.handled == 2 and patient.server.answered > 2
    hasty = busy(0.0)  # giving up after 4 short timeouts takes the busy one for lost
    with pytest.raises(ExpressFailed):
        hasty.call(Ping(1))


def test_an_answer_waiting_when_the_timer_fires_is_read_before_any_copy_is_sent(lane):
    pair = lane(first_rto=0.001, min_rto=0.001)
    call = pair.client.call("peer", Ping(3))
    deadline = time.monotonic() + 5
    while pair.server.answered < 1 and time.monotonic() < deadline:
        time.sleep(0.01)  # the answer is in the client's socket, the timer long past
    time.sleep(0.05)
    assert pair.client.result(call, 2.0) == Pong(3)
    assert pair.client.resent == 0


def test_a_copy_is_the_same_call_id_with_the_same_plaintext(lane):
    pair = lane()
    call_key, answer_key = (AESGCM(k) for k in lane_key_bytes(pair.secret, pair.lane))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(2.0)
    try:
        for seq, message in enumerate([Ping(1), Ping(1), Ping(2)], start=1):
            datagram = seal(call_key, pair.lane, seq, plaintext(REGISTRY, 5, message))
            sock.sendto(datagram, ("127.0.0.1", pair.server.port))
            answer = unseal(answer_key, sock.recv(70000))
            assert read_plaintext(REGISTRY, FrameLimits(), answer) == (5, Pong(message.seq))
    finally:
        sock.close()
    assert pair.handled == 2  # the copy of Ping(1) was not run again; Ping(2) with its id was


def test_a_lane_to_a_port_outside_the_range_is_refused():
    client = ExpressClient(REGISTRY)
    try:
        for port in (0, 70000, -1):
            with pytest.raises(ValueError, match="1-65535"):
                client.add("peer", ("127.0.0.1", port), b"12345678", os.urandom(32))
        with pytest.raises(ValueError, match="8 bytes"):
            client.add("peer", ("127.0.0.1", 9), b"1234", os.urandom(32))
        assert "peer" not in client
    finally:
        client.close()


def test_a_datagram_that_cannot_be_sent_fails_its_call_and_leaves_nothing_pending(lane):
    pair = lane()
    pair.client._lanes["peer"].address = ("127.0.0.1", 70000)  # as if a bad port got through
    call = pair.client.call("peer", Ping(1))
    with pytest.raises(ExpressFailed, match="not sent"):
        pair.client.result(call, 1.0)
    assert not pair.client._pending


def test_dropping_a_lane_by_id_keeps_a_newer_one():
    client = ExpressClient(REGISTRY)
    try:
        client.add("peer", ("127.0.0.1", 9), b"old-lane", os.urandom(32))
        client.add("peer", ("127.0.0.1", 9), b"new-lane", os.urandom(32))
        client.drop("peer", b"old-lane")  # a late failure on the old lane
        assert client.lane_id("peer") == b"new-lane"
        client.drop("peer", b"new-lane")
        assert client.lane_id("peer") is None and "peer" not in client
    finally:
        client.close()


def test_a_flood_of_datagrams_is_read_in_bounded_batches():
    client = ExpressClient(REGISTRY)
    # a local datagram pair: every datagram sent is queued at the other end before send returns
    sender, sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        for _ in range(READS_PER_WAKE + 10):
            sender.send(b"x" * 40)  # junk: no lane of this client
        assert client._read([sock])
        assert client.dropped == READS_PER_WAKE  # one batch, the rest left for later
        assert client._read([sock]) and not client._read([sock])
        assert client.dropped == READS_PER_WAKE + 10
    finally:
        sender.close()
        sock.close()
        client.close()


class _Flooded:
    """A lane socket with junk always waiting to be read: a flood the caller cannot drain."""

    def __init__(self, real: socket.socket):
        self.real = real
        self.reads = 0

    def recv(self, size: int) -> bytes:
        self.reads += 1
        return os.urandom(40)  # no lane of the client's: dropped

    def fileno(self) -> int:
        return self.real.fileno()

    def sendto(self, data: bytes, address) -> int:
        return self.real.sendto(data, address)

    def close(self) -> None:
        self.real.close()


def test_a_flood_that_never_stops_neither_holds_a_call_past_its_timeout_nor_stops_resends():
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # never read: no answers
    sink.bind(("127.0.0.1", 0))
    client = ExpressClient(REGISTRY, attempts=100)
    try:
        client.add("peer", sink.getsockname(), os.urandom(8), os.urandom(32))
        flooded = _Flooded(client._sockets[(socket.AF_INET, "127.0.0.1")])
        client._sockets[(socket.AF_INET, "127.0.0.1")] = flooded
        call = client.call("peer", Ping(1))
        outcome: list[BaseException] = []

        def wait() -> None:
            try:
                client.result(call, 0.3)
            except ExpressFailed as exc:
                outcome.append(exc)

        waiter = threading.Thread(target=wait, daemon=True)
        waiter.start()
        waiter.join(30.0)
        stuck = waiter.is_alive()
        flooded.recv = _no_more_datagrams  # frees the thread should it be stuck
        waiter.join(30.0)
        assert not stuck, "the call outlived its timeout while junk kept arriving"
        assert "within 0.3s" in str(outcome[0])
        assert flooded.reads > 0 and call.attempts > 1  # junk read, and copies still sent
    finally:
        sink.close()
        client.close()


def _no_more_datagrams(size: int) -> bytes:
    raise BlockingIOError


def test_a_lane_socket_with_a_descriptor_above_1024_is_waited_on(lane):
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200 and (hard == resource.RLIM_INFINITY or hard >= 1200):
        resource.setrlimit(resource.RLIMIT_NOFILE, (1200, hard))  # (a common soft limit: 1024)
    elif soft < 1200:
        pytest.skip(f"needs 1200 file descriptors, the hard limit is {hard}")
    held = []
    try:
        while not held or held[-1] < 1100:  # push the next descriptors above select()'s 1024
            held.append(os.open(os.devnull, os.O_RDONLY))
        pair = lane(poll=0.0)  # no polling: every answer is waited for asleep
        pair.delay = 0.01
        assert pair.call(Ping(1)) == Pong(1)
        assert max(s.fileno() for s in pair.client._sockets.values()) >= 1024
    finally:
        for fd in held:
            os.close(fd)


def test_a_quick_answer_is_read_while_polling_and_without_poll_after_a_sleep(lane):
    polling = lane(poll=1.0)
    for seq in range(5):
        assert polling.call(Ping(seq)) == Pong(seq)
    assert polling.client.polled == 5  # each answer came before the thread went to sleep
    sleeping = lane(poll=0.0)
    for seq in range(5):
        assert sleeping.call(Ping(seq)) == Pong(seq)
    assert sleeping.client.polled == 0


def test_polling_is_bounded_and_only_for_lanes_whose_answers_come_within_it(lane):
    pair = lane(poll=0.005)
    call = pair.client.call("peer", Ping(1))
    assert call.lane.srtt is None  # nothing known yet: poll, at most `poll` after sending
    assert pair.client.poll_until(call) == call.sent_at + 0.005
    call.lane.srtt = 0.004
    assert pair.client.poll_until(call) == call.sent_at + 0.005
    call.lane.srtt = 0.02  # slower than the poll: sleep at once
    assert pair.client.poll_until(call) == 0.0
    pair.client.result(call, 2.0)


def test_a_lane_slower_than_the_poll_waits_asleep(lane):
    pair = lane(poll=0.01)
    pair.server.on_call(Echo, lambda peer, msg: (time.sleep(0.04), Echo(msg.text))[1])
    assert pair.call(Echo("first")) == Echo("first")  # sets the lane's call time: ~40 ms
    probe = pair.client.call("peer", Ping(0))
    assert pair.client.poll_until(probe) == 0.0
    assert pair.client.result(probe, 2.0) == Pong(0)
    started = time.thread_time()
    for seq in range(5):
        assert pair.call(Echo(str(seq))) == Echo(str(seq))
    # five 40 ms waits: polling them would take >= 50 ms of this thread's CPU, sleeping ~none
    assert time.thread_time() - started < 0.025


def test_a_late_answer_to_an_abandoned_call_is_dropped(lane):
    gate = threading.Event()
    pair = lane(attempts=1, first_rto=0.05)

    def slow(peer, msg):
        gate.wait(2)
        return Pong(msg.seq)

    pair.server.on_call(Ping, slow)
    with pytest.raises(ExpressFailed):
        pair.call(Ping(1))
    gate.set()
    pair.server.on_call(Ping, pair.ping)
    assert pair.call(Ping(2)) == Pong(2)  # the late Pong(1) does not answer this call
    assert pair.client.dropped >= 1


def test_forged_replayed_and_unknown_datagrams_are_dropped_and_the_lane_goes_on(lane):
    pair = lane(drop=lambda direction, n: False)
    assert pair.call(Ping(1)) == Pong(1)
    captured = pair.relay.seen[0]
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    raw.bind(("127.0.0.1", 0))
    raw.settimeout(0.2)
    target = ("127.0.0.1", pair.server.port)
    wrong_key, _ = lane_key_bytes(os.urandom(32), pair.lane)
    forged = [
        b"garbage",
        captured,  # a replay: its sequence number was accepted already
        seal(AESGCM(wrong_key), pair.lane, 99, plaintext(REGISTRY, 5, Ping(5))),
        os.urandom(8) + captured[8:],  # an unknown lane
        captured[:-1] + bytes([captured[-1] ^ 1]),  # a flipped bit
    ]
    try:
        for datagram in forged:
            raw.sendto(datagram, target)
        with pytest.raises(TimeoutError):
            raw.recvfrom(70000)  # nothing is answered
    finally:
        raw.close()
    deadline = time.monotonic() + 2
    while pair.server.dropped < len(forged) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pair.server.dropped == len(forged)
    assert pair.handled == 1
    assert pair.call(Ping(2)) == Pong(2)


@pytest.mark.parametrize(
    ("message", "code"),
    [
        (Fail(ErrorCode.NOT_FOUND), ErrorCode.NOT_FOUND),
        (Unhandled(), ErrorCode.NOT_SUPPORTED),
        (Crash(), ErrorCode.INTERNAL_ERROR),
        (Echo("x" * 40000), ErrorCode.FRAME_TOO_LARGE),  # its answer would be 80000 bytes
    ],
)
def test_failures_come_back_as_remote_errors(lane, message, code):
    pair = lane()
    with pytest.raises(RemoteError) as caught:
        pair.call(message)
    assert caught.value.code == code
    assert caught.value.reason == ("asked" if isinstance(message, Fail) else "")
    assert pair.call(Ping(3)) == Pong(3)


def test_a_call_too_large_for_one_datagram_is_not_sent(lane):
    pair = lane()
    assert pair.client.call("peer", Echo("x" * MAX_PLAINTEXT)) is None
    assert pair.client.call("nobody", Ping(1)) is None  # no lane to that peer


def test_a_lane_datagram_matches_the_protocol_vector():
    vector = json.loads(VECTOR.read_text())
    secret, lane = bytes.fromhex(vector["secret"]), bytes.fromhex(vector["lane"])
    call_key, answer_key = lane_key_bytes(secret, lane)
    assert (call_key.hex(), answer_key.hex()) == (vector["call_key"], vector["answer_key"])
    body = plaintext(REGISTRY, vector["call"], Ping(vector["ping_seq"]))
    assert body.hex() == vector["plaintext"]
    datagram = seal(AESGCM(call_key), lane, vector["seq"], body)
    assert datagram.hex() == vector["datagram"]
    opened = unseal(AESGCM(call_key), bytes.fromhex(vector["datagram"]))
    assert read_plaintext(REGISTRY, FrameLimits(), opened) == (vector["call"], Ping(42))
    assert unseal(AESGCM(answer_key), datagram) is None  # the other direction's key


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_reading_any_plaintext_raises_only_the_protocols_error(data):
    with contextlib.suppress(ProtocolError):
        read_plaintext(REGISTRY, FrameLimits(), data)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.booleans())
def test_any_datagram_to_a_lane_server_is_dropped_without_an_answer(data, known_lane):
    server = ExpressServer(REGISTRY, host="127.0.0.1")
    server.on_call(Ping, lambda peer, msg: Pong(msg.seq))
    lane = server.open_lane(PEER, "connection", bytes(32))
    datagram = (lane + data[8:]) if known_lane else data
    server._datagram(datagram, ("127.0.0.1", 9))  # no socket: an answer would fail loudly
    assert server.dropped == 1 and server.answered == 0


async def test_lanes_are_granted_over_quic_and_close_with_the_connection(mesh):
    async with quic_pair(mesh) as pair:
        server = ExpressServer(REGISTRY, host="127.0.0.1")
        server.on_call(Ping, lambda peer, msg: Pong(msg.seq))
        server.attach(pair.b)
        conn = await pair.connect()
        with pytest.raises(RemoteError) as caught:  # not started: no socket to grant
            await conn.request(ExpressOpen(os.urandom(32)), timeout=5)
        assert caught.value.code == ErrorCode.UNAVAILABLE
        server.start()
        client = ExpressClient(REGISTRY, attempts=2, first_rto=0.02)
        try:
            with pytest.raises(RemoteError) as caught:
                await conn.request(ExpressOpen(b"short"), timeout=5)
            assert caught.value.code == ErrorCode.BAD_REQUEST
            secret = os.urandom(32)
            grant = await conn.request(ExpressOpen(secret), timeout=5)
            assert isinstance(grant, ExpressLane) and grant.port == server.port
            client.add("b", ("127.0.0.1", grant.port), grant.lane, secret)
            call = client.call("b", Ping(11))
            assert client.result(call, 2.0) == Pong(11)
            assert server.lanes == 1
            conn.close()
            # the lane closes with the connection that opened it
            await until(lambda: server.lanes == 0, what="the lane closed")
            with pytest.raises(ExpressFailed):
                client.result(client.call("b", Ping(12)), 2.0)
        finally:
            client.close()
            server.close()


def test_a_new_lane_is_probed_and_its_numbering_goes_on_from_the_probe(lane):
    pair = lane()
    address = ("127.0.0.1", pair.server.port)
    call_ids = []
    answer = pair.server._answer

    def spy(peer, call_id, plain):
        call_ids.append(call_id)
        return answer(peer, call_id, plain)

    pair.server._answer = spy
    start = probe_lane(REGISTRY, address, pair.lane, pair.secret, timeout=2.0)
    assert start.sent == 1 and start.seen == 1 and start.srtt is not None
    assert pair.handled == 1  # the probe's Ping
    client = ExpressClient(REGISTRY)
    try:
        client.add("peer", address, pair.lane, pair.secret, start)
        call = client.call("peer", Ping(7))
        assert client.result(call, 2.0) == Pong(7)  # seq 2: above what the server saw
        assert call.lane.sent == 2 and pair.server.dropped == 0
        assert call.rto < 0.1  # timed from the probe's round trip, not the first guess
        assert len(call_ids) == 2 and call_ids[0] != call_ids[1]  # two calls, two call ids
    finally:
        client.close()


def test_a_lane_that_does_not_answer_fails_its_probe():
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # bound, never answers
    silent.bind(("127.0.0.1", 0))
    try:
        started = time.monotonic()
        with pytest.raises(ExpressFailed):
            probe_lane(REGISTRY, silent.getsockname(), b"12345678", os.urandom(32), timeout=0.3)
        assert time.monotonic() - started < 2.0
    finally:
        silent.close()


def test_an_error_answer_passes_the_probe(lane):
    server = ExpressServer(REGISTRY, host="127.0.0.1")  # serves no Ping: answers NOT_SUPPORTED
    server.start()
    try:
        secret = os.urandom(32)
        granted = server.open_lane(PEER, "connection", secret)
        start = probe_lane(REGISTRY, ("127.0.0.1", server.port), granted, secret)
        assert start.sent == 1 and start.seen == 1
    finally:
        server.close()


def test_one_connection_cannot_push_out_the_lanes_of_others():
    server = ExpressServer(REGISTRY, host="127.0.0.1", max_lanes=32, max_lanes_per_owner=4)
    try:
        other = server.open_lane(PEER, "another connection", os.urandom(32))
        greedy = [server.open_lane(PEER, "greedy connection", os.urandom(32)) for _ in range(40)]
        assert server.lanes == 5  # the other's lane, and the greedy one's 4 newest
        assert set(server._lanes) == {other, *greedy[-4:]}
    finally:
        server.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="IP_MTU_DISCOVER is Linux's")
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_lane_sockets_never_set_dont_fragment_on_ipv4_even_when_dual_stack(host):
    """A lane socket bound to "::" (a node on IPv6) answers IPv4 callers too, through mapped
    addresses: those datagrams must not set DF. The option is set on every lane socket when it
    is made (checked here on loopback binds: tests listen on no other interface)."""
    server = ExpressServer(REGISTRY, host=host)
    try:
        server.start()
    except OSError as exc:  # a machine without IPv6
        pytest.skip(f"cannot bind {host}: {exc}")
    try:
        assert server._sock.getsockopt(socket.IPPROTO_IP, 10) == 0  # IP_MTU_DISCOVER: DONT
    finally:
        server.close()


def test_a_lane_to_a_loopback_address_calls_from_a_loopback_socket():
    """Nothing but the peer answers a lane: to a loopback peer the calling socket listens on
    loopback only, not on every interface."""
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    client = ExpressClient(REGISTRY)
    try:
        client.add("peer", sink.getsockname(), os.urandom(8), os.urandom(32))
        (sock,) = client._sockets.values()
        assert sock.getsockname()[0] == "127.0.0.1"
    finally:
        client.close()
        sink.close()


@pytest.mark.parametrize(
    ("family", "remote", "own", "bound"),
    [
        (socket.AF_INET, "127.0.0.1", None, "127.0.0.1"),
        (socket.AF_INET, "127.0.0.5", "10.0.0.2", "127.0.0.1"),  # loopback wins over own
        (socket.AF_INET6, "::1", None, "::1"),
        (socket.AF_INET6, "::ffff:127.0.0.1", None, "::"),  # an IPv4 loopback: not ::1's
        (socket.AF_INET, "10.0.0.7", "10.0.0.2", "10.0.0.2"),  # a node bound to one address
        (socket.AF_INET, "10.0.0.7", "0.0.0.0", "0.0.0.0"),
        (socket.AF_INET6, "2001:db8::7", "10.0.0.2", "::"),
        # a node on IPv6 calling IPv4 (it bound its IPv4 socket to '::' and could not dial)
        (socket.AF_INET, "10.0.0.7", "::", "0.0.0.0"),
        (socket.AF_INET, "10.0.0.7", "fd00::2", "0.0.0.0"),
        (socket.AF_INET, "10.0.0.7", "::ffff:10.0.0.2", "10.0.0.2"),
        (socket.AF_INET, "10.0.0.7", "node-a", "node-a"),  # (a name: its IPv4 address)
    ],
)
def test_a_calling_socket_binds_loopback_for_loopback_peers_only(family, remote, own, bound):
    assert calling_address(family, remote, own) == bound
