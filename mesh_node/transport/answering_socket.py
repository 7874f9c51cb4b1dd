"""A UDP socket on all interfaces (0.0.0.0, ::) that answers each peer from the address the
peer sent to.

Bound to all interfaces, a socket's datagrams leave from the address the kernel picks for the
route back: on a machine with several addresses on the way to a peer (a second address on an
interface, IPv6's temporary and stable addresses side by side), not always the one the peer
dialed. A QUIC client drops what comes from another address than the one it dialed (RFC 9000
section 9; aioquic does), so a node dialed at such an address never answered: its peers timed
out. This socket asks the kernel for each datagram's destination (IP_PKTINFO,
IPV6_RECVPKTINFO) and sends to that peer from it. Linux only; elsewhere the listener keeps
asyncio's own socket.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import struct
import sys
from typing import Any

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)  # <linux/in.h>
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)  # <linux/in6.h>
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
_ANCILLARY = socket.CMSG_SPACE(20)  # room for one in6_pktinfo (an in_pktinfo is 12 bytes)
MAX_DATAGRAM = 65535
MAX_PEERS = 4096  # peer addresses whose local address is kept (oldest forgotten first)
MAX_QUEUED = 1024  # datagrams waiting for room in the socket's buffer; more are dropped


def answers_from_dialed_address(host: str) -> bool:
    """Whether a listener on `host` needs an `AnsweringSocket` (all interfaces, on Linux)."""
    return host in ("0.0.0.0", "::") and sys.platform.startswith("linux")


class AnsweringSocket(asyncio.DatagramTransport):
    """A datagram transport over a bound, non-blocking UDP socket, for `protocol`."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, protocol: asyncio.BaseProtocol
    ):
        super().__init__(extra={"socket": sock, "sockname": sock.getsockname()})
        self._loop, self._sock, self._protocol = loop, sock, protocol
        if sock.family == socket.AF_INET6:  # (IPv4 peers too: as IPv4-mapped addresses)
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        # peer address -> the ancillary item that sends from where its last datagram came to
        self._from: collections.OrderedDict[Any, tuple[int, int, bytes]] = collections.OrderedDict()
        self._queue: collections.deque[tuple[bytes, Any]] = collections.deque()
        self._closing = False
        loop.add_reader(sock.fileno(), self._read_ready)
        loop.call_soon(protocol.connection_made, self)

    @classmethod
    async def listen(
        cls, protocol: asyncio.DatagramProtocol, host: str, port: int
    ) -> AnsweringSocket:
        """Bind `host` ('0.0.0.0' or '::') and `port` (raises OSError, e.g. EADDRINUSE)."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind((host, port))
            transport = cls(asyncio.get_running_loop(), sock, protocol)
        except BaseException:
            sock.close()
            raise
        await asyncio.sleep(0)  # (connection_made has run: the protocol has its transport)
        return transport

    def _read_ready(self) -> None:
        try:
            data, ancillary, _, addr = self._sock.recvmsg(MAX_DATAGRAM, _ANCILLARY)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._protocol.error_received(exc)
            return
        for level, kind, value in ancillary:
            if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(value) >= 12:
                # in_pktinfo {ifindex, spec_dst, addr}: send from addr, by any interface
                item = (level, kind, struct.pack("=i4s4s", 0, value[8:12], bytes(4)))
            elif level == socket.IPPROTO_IPV6 and kind == IPV6_PKTINFO and len(value) >= 20:
                item = (level, kind, struct.pack("=16si", value[:16], 0))  # in6_pktinfo
            else:
                continue
            if self._from.get(addr) != item:
                self._from[addr] = item
                if len(self._from) > MAX_PEERS:
                    self._from.popitem(last=False)
        self._protocol.datagram_received(data, addr)

    def sendto(self, data: Any, addr: Any = None) -> None:
        if self._closing:
            return
        if self._queue:  # (in order: behind what waits already)
            if len(self._queue) < MAX_QUEUED:
                self._queue.append((bytes(data), addr))
            return
        try:
            self._send(data, addr)
        except (BlockingIOError, InterruptedError):
            self._queue.append((bytes(data), addr))
            self._loop.add_writer(self._sock.fileno(), self._write_ready)
        except OSError as exc:
            self._protocol.error_received(exc)

    def _send(self, data: Any, addr: Any) -> None:
        item = self._from.get(addr)
        if item is None:
            self._sock.sendto(data, addr)
        else:
            self._sock.sendmsg([data], [item], 0, addr)

    def _write_ready(self) -> None:
        while self._queue:
            data, addr = self._queue[0]
            try:
                self._send(data, addr)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._protocol.error_received(exc)
            self._queue.popleft()
        self._loop.remove_writer(self._sock.fileno())

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._loop.remove_reader(self._sock.fileno())
        if self._queue:
            self._loop.remove_writer(self._sock.fileno())
            self._queue.clear()
        self._sock.close()
        self._loop.call_soon(self._protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()
