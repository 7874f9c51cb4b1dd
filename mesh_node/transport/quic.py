"""QUIC carrier (aioquic) and the QUIC endpoint that listens and dials.

`QuicCarrier` is the thin `QuicConnectionProtocol` subclass: it turns aioquic events into
calls on a `Connection` and offers the `Carrier` operations on top of aioquic's API. All
protocol logic lives in `Connection`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import errno
import ipaddress
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any

from aioquic import tls
from aioquic.asyncio import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.buffer import Buffer
from aioquic.quic import events
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE, QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicPacketType, pull_quic_header
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import NameOID

from mesh_node.identity import MeshSecret, NodeId, NodeIdentity
from mesh_node.transport.addresses import PortInUse, calling_address, normalize_host
from mesh_node.transport.answering_socket import AnsweringSocket, answers_from_dialed_address
from mesh_node.transport.connection import Connection
from mesh_node.transport.datagram_size import datagram_size
from mesh_node.transport.endpoint import Address, Endpoint
from mesh_node.transport.errors import ConnectionLost, ErrorCode
from mesh_node.transport.handshake import ALPN

log = logging.getLogger("mesh_node.transport")


def self_signed_certificate(identity: NodeIdentity) -> x509.Certificate:
    """A TLS certificate for the node key, signed by itself (the key is what peers check)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"mesh-node {identity.node_id}")])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(identity.private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .sign(identity.private_key, algorithm=None)
    )


MAX_LOOKUPS = 8  # host names being resolved at once (each holds an executor thread meanwhile)
MAX_ADDRESSES = 4  # addresses of a host name dialed in turn (the time shared between them)
ACK_HOLD = 0.020  # see QuicCarrier (acknowledgements); below the 25 ms max_ack_delay announced
BURST_GAP = 0.001  # packets closer than this (aioquic's acknowledgement delay), none between
ACK_HOLD_PACKETS = 8  # packets held at most; then due at once (a writer waits at 256 KiB unacked)
SOCKET_BUFFER = 4 << 20  # bytes asked for each UDP socket's send and receive buffers
# QUIC flow control: the windows a connection starts with, per stream and over the whole
# connection (aioquic raises them as data arrives, so they pace a sender rather than bound what
# is buffered; the frame limits and stream credit do that). The stream window is above the
# largest tensor payloads the mesh sends in one message plus their frame header: with a window
# of exactly 1 MiB, a 1 MiB tensor's last header-sized bytes waited for the receiver's window
# update, late in the transfer (benchmarks/transport.py, 1 MiB throughput against bare aioquic
# with the same windows: 0.91-0.92 -> 0.93-0.94).
STREAM_WINDOW = 4 << 20
CONNECTION_WINDOW = 8 << 20


def size_socket_buffers(transport: asyncio.BaseTransport) -> None:
    """Ask for `SOCKET_BUFFER`-byte buffers on a transport's UDP socket. A connection sends
    bursts of up to its congestion window in large datagrams (see datagram_size); Linux's
    default 208 KiB receive buffer holds 13 of 16000 bytes, and dropped about 1% of a 1 MiB
    transfer's datagrams on loopback, each loss halving the window. The kernel caps the size
    at net.core.rmem_max / wmem_max; a smaller result is not an error."""
    sock = transport.get_extra_info("socket")
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)


class QuicCarrier(QuicConnectionProtocol):
    """One aioquic connection seen as a `Carrier`."""

    def __init__(
        self,
        quic: QuicConnection,
        *,
        make_connection: Callable[[QuicCarrier], Connection],
        remote: Address | None = None,
        **kwargs: Any,
    ):
        super().__init__(quic, **kwargs)
        self.is_client = quic.configuration.is_client
        self._remote = remote
        self._in_events = False
        self._wrote = False  # something was written while events were being processed
        self._held_ack_at: float | None = None  # aioquic's time for the held acknowledgement
        self._held_packets = 0  # packets that arrived since it was held
        self._last_asked = 0.0  # when the last packet that asked for an ack arrived (loop time)
        self._last_wrote = 0.0  # when data was last written (loop time)
        self._quick = False  # that packet came within BURST_GAP of the data written before it
        self._ack_after = False  # send the held acknowledgement right after the data written
        self._space: Any = None  # aioquic's 1-RTT packet space, once there is one
        self.connection = make_connection(self)

    # ---- Carrier operations
    @property
    def remote_address(self) -> Address:
        if self._remote is None:
            paths = self._quic._network_paths
            if paths:
                addr = paths[0].addr
                self._remote = (normalize_host(addr[0]), addr[1])
            else:
                return ("?", 0)
        return self._remote

    @property
    def remote_ip(self) -> str:
        paths = self._quic._network_paths
        return normalize_host(paths[0].addr[0]) if paths else self.remote_address[0]

    def open_stream(self, unidirectional: bool) -> int:
        return self._quic.get_next_available_stream_id(is_unidirectional=unidirectional)

    def write(self, stream_id: int, data: bytes | memoryview, end: bool = False) -> None:
        try:
            self._quic.send_stream_data(stream_id, data, end_stream=end)  # type: ignore[arg-type]
        except ValueError as exc:  # aioquic: a stream already finished and discarded
            raise RuntimeError(str(exc)) from None
        self._wrote = True
        self._ack_with_data()

    def flush(self) -> None:
        # inside event processing the protocol transmits right after (answers share the
        # acknowledgement's packet); elsewhere send now rather than on the next loop turn
        if not self._in_events:
            self._transmit_written()

    def reset(self, stream_id: int, code: int) -> None:
        self._quic.reset_stream(stream_id, code)
        self._transmit_soon()

    def stop(self, stream_id: int, code: int) -> None:
        with contextlib.suppress(ValueError):  # unknown or already finished stream
            self._quic.stop_stream(stream_id, code)
            self._transmit_soon()

    def unacked(self, stream_id: int) -> int:
        # aioquic keeps written data in the sender's buffer until the peer acknowledges it
        stream = self._quic._streams.get(stream_id)
        if stream is None:
            return 0
        sender = stream.sender
        return sender._buffer_stop - sender._buffer_start

    def server_key(self) -> bytes | None:
        cert = self._quic.tls._peer_certificate
        if cert is None:
            return None
        key = cert.public_key()
        if not isinstance(key, Ed25519PublicKey):
            return None
        return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @property
    def datagram_size(self) -> int:
        """The largest UDP datagram this side sends (see `datagram_size`)."""
        return self._quic._max_datagram_size

    def rtt(self) -> float | None:
        loss = self._quic._loss
        return loss._rtt_smoothed if loss._rtt_initialized else None

    # close(code, reason) is QuicConnectionProtocol.close(error_code, reason_phrase)

    # ---- aioquic events -> Connection
    def quic_event_received(self, event: events.QuicEvent) -> None:
        conn = self.connection
        if isinstance(event, events.StreamDataReceived):
            conn.stream_data(event.stream_id, event.data, event.end_stream)
        elif isinstance(event, events.StreamReset | events.StopSendingReceived):
            conn.stream_reset(event.stream_id, event.error_code)
        elif isinstance(event, events.HandshakeCompleted):
            if self.is_client:
                conn.start()
        elif isinstance(event, events.ConnectionTerminated):
            if event.frame_type is None:  # an application close: our own error codes
                conn.connection_terminated(event.error_code, event.reason_phrase)
            else:  # QUIC/TLS closed it (idle timeout, TLS alert, ...): another code space
                reason = f"QUIC error 0x{event.error_code:x}: {event.reason_phrase or 'no reason'}"
                conn.connection_terminated(ErrorCode.LINK_ERROR, reason)

    # ---- acknowledgements: aioquic acknowledges every ack-eliciting packet 1 ms after it
    # arrives, in a packet of its own unless data happens to leave at that very moment. A
    # call's request or answer alone then costs a second datagram each way, and waking the
    # process at the other end for it (a busy expert peer, a host decoding). Here:
    # * a packet that arrives alone keeps its acknowledgement for the data that goes back (the
    #   answer, the next request), at most ACK_HOLD or ACK_HOLD_PACKETS packets;
    # * once aioquic's time for it has come, it goes with that data. In a fast exchange (each
    #   side answering within BURST_GAP) it leaves in a packet of its own right after the
    #   data's: each side handles the acknowledgement while the other works on the data
    #   (inside the data's packet it cost a round trip ~25-40 us, once a millisecond each
    #   way). In a slow one (a call taking milliseconds) it goes inside the data's packet;
    # * a burst (a packet asking for an acknowledgement within BURST_GAP of the one before,
    #   with nothing sent back in between: bulk data) is acknowledged as aioquic does. (Timed
    #   from the held packet instead, a burst that began after a call's held acknowledgement
    #   was due went unacknowledged for ACK_HOLD_PACKETS packets.)
    # Packets that ask for no acknowledgement (the peer's own acknowledgements) change none
    # of this: counted as packets of an exchange they made its next call look like a burst,
    # and its acknowledgement went on a timer, landing inside a later call's round trip
    # (most of the transport benchmark's slowest 2% of round trips).
    def _app_space(self) -> Any:
        """aioquic's 1-RTT packet space (None until the connection has set its spaces up).
        Kept once the handshake is complete: until then a client starts its spaces afresh on
        a Retry, and a space kept from before would be a dead one."""
        if self._space is not None:
            return self._space
        space = self._quic._spaces.get(tls.Epoch.ONE_RTT)
        if self._quic._handshake_complete:
            self._space = space
        return space

    def _hold(self, space: Any, now: float) -> None:
        """The first packet waiting for an acknowledgement (aioquic just set its time)."""
        self._held_ack_at = space.ack_at  # aioquic's time for it
        self._held_packets = 1
        self._ack_after = False  # (any earlier one went: nothing was held)
        self._asked(now)
        space.ack_at = now + ACK_HOLD

    def _held_more(self, space: Any, ack_before: float | None, now: float) -> None:
        """A datagram arrived while an acknowledgement is held (`space.ack_at` was cleared
        for it: aioquic set it again if the datagram asks for an acknowledgement)."""
        asked, space.ack_at = space.ack_at is not None, ack_before
        if not asked:
            return
        self._held_packets += 1
        replied = self._last_wrote > self._last_asked  # data went back since the last one
        burst = now - self._last_asked < BURST_GAP and not replied
        self._asked(now)
        if burst:
            self.acknowledge()
        elif self._held_packets >= ACK_HOLD_PACKETS:
            # many held in an exchange (calls faster than aioquic's 1 ms): due now, with the
            # data going back (within BURST_GAP, else alone), not on aioquic's timer
            self._held_ack_at = now
            space.ack_at = min(space.ack_at, now + BURST_GAP)

    def _asked(self, now: float) -> None:
        self._last_asked = now
        self._quick = now - self._last_wrote < BURST_GAP

    def acknowledge(self) -> None:
        """The peer waits for the acknowledgement of what has arrived (the end of a one-way
        message): send it on aioquic's time, not held for data going back."""
        held, self._held_ack_at = self._held_ack_at, None
        space = self._space  # there is one whenever an acknowledgement is held
        if held is not None and space.ack_at is not None:
            space.ack_at = min(space.ack_at, held)

    def _ack_with_data(self) -> None:
        """Data was written: a held acknowledgement goes with it once aioquic's time for it
        has come (sooner would put acknowledgement work on every round trip of a fast
        exchange): right after the data's packet in a fast exchange (the packet this data
        answers came within BURST_GAP of our data before it, and this data within BURST_GAP
        of that packet), inside it otherwise (a slow call: one datagram, not two)."""
        now = self._last_wrote = self._loop.time()
        held = self._held_ack_at
        if held is not None and held <= now:
            self._held_ack_at = None
            if self._quick and now - self._last_asked < BURST_GAP:
                self._ack_after = True
            elif self._space.ack_at is not None:  # (not sent meanwhile)
                self._space.ack_at = now

    def _transmit_written(self) -> None:
        """Send what was written, and then the acknowledgement that follows it."""
        self.transmit()
        if self._ack_after:
            self._ack_after = False
            space = self._space
            if space.ack_at is not None:  # (not sent meanwhile)
                space.ack_at = self._loop.time()
                # alone, unless paced data is waiting: then in that data's next packet
                if self._quic._pacing_at is None:
                    self.transmit()

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        self._in_events = True
        self._wrote = False
        self.connection.woke = False
        try:
            now = self.connection.last_heard = self._loop.time()  # (acknowledgements count)
            space = self._space or self._app_space()
            # (cheap for the datagrams of a burst: an acknowledgement pending, none held)
            ack_before = None if space is None else space.ack_at
            held = self._held_ack_at is not None
            if held:
                if ack_before is None:  # it went meanwhile (aioquic's timer, a probe)
                    self._held_ack_at, held = None, False
                else:
                    space.ack_at = None
            try:
                self._quic.receive_datagram(data, addr, now=now)  # type: ignore[arg-type]
            finally:  # (the hold's time is put back whatever happens)
                if held:
                    self._held_more(space, ack_before, now)
            kept = space is not None and space is self._space  # handshake done: see _app_space
            if not held and kept and ack_before is None and space.ack_at is not None:
                self._hold(space, now)
            self._process_events()
            self.connection.writable()
        finally:
            self._in_events = False
        if self.connection.woke and not self._wrote:
            # this datagram answered a call or started a handler, and nothing new was written:
            # what is left to send (acknowledgements, the timer to re-arm) waits until the
            # woken tasks have run, so a caller resumes (a handler starts its work, hands it
            # to a worker thread) one transmit sooner, and what they send goes with it
            self._transmit_soon()
        else:  # answers written by inline handlers, or data waiting on this acknowledgement
            self._transmit_written()

    def _handle_timer(self) -> None:
        self._in_events = True
        try:
            super()._handle_timer()  # processes events, then transmits (nothing new yet)
            self.connection.writable()  # loss recovery may have acknowledged or dropped data
        finally:
            self._in_events = False
        self.transmit()


class QuicListener(QuicServer):
    """aioquic's server, with three changes for a port anyone can send to:

    - **Retry** (RFC 9000 8.1.2): a first Initial is answered with a small Retry packet holding
      an address token, and only an Initial that returns it builds a connection. A spoofed
      source address never gets that far, and the answer is smaller than what came (no
      amplification towards a victim).
    - **Handshakes in progress are bounded**: a connection counts from its first Initial until
      its peer has proven its node key and the mesh secret (or it closes; the handshake's own
      timeout, 10 s by default, ends it). Beyond `max_handshakes` at once, or
      `max_handshakes_per_address` from one IP address, a new connection's Initial is dropped
      (its sender tries again later, as after a lost packet): one flooding host cannot spend
      this node's CPU on TLS handshakes and starve its probes, and everyone else still gets in.
    - each new connection gets the datagram size of its peer's path (aioquic takes it from
      the configuration, which a server shares between connections), worked out only for an
      Initial that does build one."""

    max_handshakes = 64
    max_handshakes_per_address = 8
    refusal_log_interval = 60.0  # seconds between log lines about dropped Initials

    def __init__(
        self,
        *,
        configuration: QuicConfiguration,
        create_protocol: Callable[..., QuicCarrier],
        **kwargs: Any,
    ):
        super().__init__(
            configuration=configuration, create_protocol=self._create, retry=True, **kwargs
        )
        self._base = configuration
        self._sized: dict[int, QuicConfiguration] = {configuration.max_datagram_size: configuration}
        self._make_carrier = create_protocol
        self._unproven: dict[QuicCarrier, str] = {}  # connections in their handshake: their IP
        self._opening_from = ""
        self.refused = 0  # Initials dropped for the bounds above
        self._refusals_logged = -self.refusal_log_interval

    def _create(self, quic: QuicConnection, **kwargs: Any) -> QuicCarrier:
        carrier = self._make_carrier(quic, **kwargs)
        self._unproven[carrier] = self._opening_from
        return carrier

    def _opens_connection(self, data: bytes) -> bool:
        """What makes aioquic's server build a connection: a full-size Initial for a connection
        id it does not know, carrying a Retry token."""
        if len(data) < SMALLEST_MAX_DATAGRAM_SIZE or not data[0] & 0x80:
            return False
        try:
            header = pull_quic_header(
                Buffer(data=data), host_cid_length=self._base.connection_id_length
            )
        except ValueError:
            return False
        return (
            header.packet_type == QuicPacketType.INITIAL
            and bool(header.token)  # (Retry is always on: a first Initial carries none)
            and header.destination_cid not in self._protocols
        )

    def _admit(self, host: str) -> bool:
        for carrier in [c for c in self._unproven if not c.connection.authenticating]:
            del self._unproven[carrier]
        if len(self._unproven) < self.max_handshakes and (
            sum(1 for source in self._unproven.values() if source == host)
            < self.max_handshakes_per_address
        ):
            return True
        self.refused += 1
        now = self._loop.time()
        if now - self._refusals_logged >= self.refusal_log_interval:
            self._refusals_logged = now
            log.warning(
                "dropping new QUIC connections (from %s, %d so far): %d handshakes in progress "
                "(at most %d, %d per address)",
                host,
                self.refused,
                len(self._unproven),
                self.max_handshakes,
                self.max_handshakes_per_address,
            )
        return False

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        if self._opens_connection(data):  # type: ignore[arg-type]
            if not self._admit(addr[0]):
                return
            size = datagram_size(addr[0])
            config = self._sized.get(size)
            if config is None:
                config = dataclasses.replace(self._base, max_datagram_size=size)
                self._sized[size] = config
            self._configuration = config
            self._opening_from = addr[0]
        super().datagram_received(data, addr)


class QuicEndpoint(Endpoint):
    """Endpoint over QUIC: one UDP socket listening, one more per dialed connection."""

    def __init__(
        self,
        identity: NodeIdentity,
        mesh: MeshSecret,
        *,
        host: str = "0.0.0.0",
        port: int = 7300,
        idle_timeout: float = 30.0,
        **endpoint_args: Any,  # registry, handlers, limits: see Endpoint
    ):
        super().__init__(identity, mesh, host=host, port=port, **endpoint_args)
        self.idle_timeout = idle_timeout
        self._certificate = self_signed_certificate(identity)
        self._server: QuicListener | None = None
        self._client_transports: dict[Connection, asyncio.DatagramTransport] = {}
        self._reapers: set[asyncio.Task[None]] = set()
        self._lookups = 0  # name lookups running in the executor (see MAX_LOOKUPS)

    def normalize_host(self, host: str) -> str:
        return normalize_host(host)

    def _configuration(self, is_client: bool) -> QuicConfiguration:
        config = QuicConfiguration(
            is_client=is_client,
            alpn_protocols=[ALPN],
            idle_timeout=self.idle_timeout,
            max_stream_data=STREAM_WINDOW,
            max_data=CONNECTION_WINDOW,
        )
        if is_client:
            # we check the server's key ourselves in the handshake (it is not CA-signed)
            config.verify_mode = ssl.CERT_NONE
            config.server_name = "mesh-node"
        else:
            config.certificate = self._certificate
            config.private_key = self.identity.private_key
        return config

    async def start(self) -> None:
        """Bind the UDP port (0 picks a free one; `self.port` holds the result)."""
        configuration = self._configuration(is_client=False)
        listener = QuicListener(
            configuration=configuration,
            create_protocol=lambda quic, **kw: QuicCarrier(
                quic, make_connection=self.new_connection, **kw
            ),
        )
        try:
            if answers_from_dialed_address(self.host):  # (see answering_socket)
                await AnsweringSocket.listen(listener, self.host, self.port)
            else:
                await asyncio.get_running_loop().create_datagram_endpoint(
                    lambda: listener, local_addr=(self.host, self.port)
                )
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse("quic", "QUIC (udp)", self.host, self.port) from exc
            raise OSError(f"cannot listen on {self.host}:{self.port} (udp): {exc}") from exc
        self._server = listener
        size_socket_buffers(self._server._transport)
        sock = self._server._transport.get_extra_info("socket")
        self.port = sock.getsockname()[1]
        log.info("listening on %s:%d (udp) as %s", self.host, self.port, self.node_id.short)

    async def _dial(
        self, host: str, port: int, expect: NodeId | None, timeout: float
    ) -> Connection:
        """Dial host:port: each address a name resolves to in turn (a first share of the time
        to ::1 of 'localhost' must not keep the dial from 127.0.0.1), each with an equal share
        of the time left."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        targets = await self._resolve(host, port, timeout)
        failure: ConnectionLost | None = None
        for tried, (family, addr) in enumerate(targets):
            share = max(deadline - loop.time(), 0.001) / (len(targets) - tried)
            try:
                return await self._dial_address(host, port, family, addr, expect, share)
            except ConnectionLost as exc:
                failure = exc
                if len(targets) > 1:
                    log.debug("dialing %s:%d at %s: %s", host, port, addr[0], exc)
        assert failure is not None  # (a lookup gives at least one address)
        raise failure

    async def _dial_address(
        self,
        host: str,
        port: int,
        family: int,
        addr: tuple,
        expect: NodeId | None,
        timeout: float,
    ) -> Connection:
        loop = asyncio.get_running_loop()
        configuration = self._configuration(is_client=True)
        configuration.max_datagram_size = datagram_size(addr[0])
        quic = QuicConnection(configuration=configuration)
        local = (calling_address(family, addr[0], own=self.host), 0)
        try:
            transport, carrier = await loop.create_datagram_endpoint(
                lambda: QuicCarrier(
                    quic,
                    make_connection=lambda c: self.new_connection(c, expect),
                    remote=(host, port),
                ),
                local_addr=local,
                family=family,
            )
        except OSError as exc:
            raise ConnectionLost(f"cannot open a UDP socket to dial {host}:{port}: {exc}") from None
        size_socket_buffers(transport)
        conn = carrier.connection
        self._client_transports[conn] = transport
        reaper = asyncio.ensure_future(self._reap(conn, carrier, transport))
        self._reapers.add(reaper)
        reaper.add_done_callback(self._reapers.discard)
        carrier.connect(addr)
        return await self._await_open(conn, f"{host}:{port}", timeout)

    async def _resolve(self, host: str, port: int, timeout: float) -> list[tuple[int, tuple]]:
        """(family, socket address) of host:port, for each address a name has (at most
        MAX_ADDRESSES, in the resolver's order). An IP address needs no lookup; a name is
        looked up within `timeout`, at most MAX_LOOKUPS at once (a lookup holds an executor
        thread until the resolver answers, however long: names a peer hands over must not
        queue every later dial behind them)."""
        try:
            ip = ipaddress.ip_address(host.split("%")[0])
        except ValueError:
            ip = None
        if ip is not None and "%" not in host:  # (in standard form, as replies will come from)
            family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
            return [(family, ((str(ip), port, 0, 0) if ip.version == 6 else (str(ip), port)))]
        if self._lookups >= MAX_LOOKUPS:
            raise ConnectionLost(f"cannot resolve {host}: {MAX_LOOKUPS} name lookups running")
        loop = asyncio.get_running_loop()
        self._lookups += 1
        lookup = asyncio.ensure_future(loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM))

        def finished(done: asyncio.Future) -> None:
            self._lookups -= 1
            if not done.cancelled():
                done.exception()  # (retrieved: a caller that gave up must not cause a warning)

        lookup.add_done_callback(finished)
        try:
            async with asyncio.timeout(timeout):
                infos = await asyncio.shield(lookup)  # (the thread runs on: counted until done)
        except TimeoutError:
            raise ConnectionLost(f"cannot resolve {host} within {timeout:g}s") from None
        except (OSError, ValueError) as exc:  # ValueError: e.g. a label over 63 characters
            raise ConnectionLost(f"cannot resolve {host}: {exc}") from None
        found: dict[tuple, int] = {}
        for family, _, _, _, addr in infos:
            found.setdefault(addr, family)
        if not found:
            raise ConnectionLost(f"cannot resolve {host}: no address")
        return [(family, addr) for addr, family in found.items()][:MAX_ADDRESSES]

    async def _reap(
        self, conn: Connection, carrier: QuicCarrier, transport: asyncio.DatagramTransport
    ) -> None:
        """Close a dialed connection's socket once the connection is over."""
        await conn.wait_closed()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):  # aioquic's closing/draining period
                await carrier.wait_closed()
        transport.close()
        self._client_transports.pop(conn, None)

    async def _shutdown(self) -> None:
        for transport in list(self._client_transports.values()):
            transport.close()  # CONNECTION_CLOSE datagrams were sent by close() already
        for reaper in list(self._reapers):
            reaper.cancel()
        if self._server is not None:
            self._server.close()
            self._server = None
        await asyncio.sleep(0)  # let the transports finish closing
