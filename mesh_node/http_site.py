"""An aiohttp application served on a TCP port: started, and stopped within a bound.

The console and the OpenAI-compatible API are both such sites (`HttpServer` subclasses).
A client that goes away cancels its handler at once (`handler_cancellation`: an abandoned
generation or event stream stops); a connection idle, or still sending its request's headers,
`idle_timeout` seconds after it opened or after its last answer is closed; stopping waits at
most `shutdown_timeout` (+2 s) for open requests.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
from collections.abc import Iterable
from typing import Self

import yarl
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from mesh_node.transport.addresses import PortInUse

log = logging.getLogger("mesh_node.http")

# seconds a connection may stay idle or take to send a request's headers (a slowloris holds up
# to 128 header lines of 8 KB each meanwhile); aiohttp's own default is an hour
IDLE_TIMEOUT = 30.0


def _is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _split_host(host: str) -> tuple[str, int | None]:
    """A Host header's (or an origin's authority's) name, lowercased, and port (None if none
    or not a number)."""
    name = host.strip().lower()
    if name.startswith("["):  # [IPv6] or [IPv6]:port
        name, _, rest = name[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif name.count(":") == 1:
        name, _, port = name.partition(":")
    else:  # a name, or a bare IPv6 address
        port = ""
    return name, int(port) if port.isdigit() else None


def machine_names() -> frozenset[str]:
    """This machine's own names, as a browser on the LAN may reach it: its hostname, its first
    label, and that label under `.local` (mDNS). No lookup is made."""
    full = socket.gethostname().lower().rstrip(".")
    label = full.split(".")[0]
    return frozenset(name for name in (full, label, f"{label}.local") if name)


class HostPolicy:
    """Which names a site answers to, against DNS rebinding (a web page whose name was rebound
    to this site's address, reading it from the user's browser) and cross-site requests (a
    page elsewhere making the user's browser send requests here).

    Host header: on a loopback bind only loopback names (localhost, *.localhost, loopback
    addresses); on any other bind also any IP address and this machine's names. Names in
    `allowed` are accepted on either (a reverse proxy's public name). Origin header (sent by
    browsers on cross-origin requests and on every POST): it must name this very site, the
    request's own Host, since neither site sends CORS headers and no other page has any
    business here. Requests without the headers (curl, SDKs) pass."""

    def __init__(self, bound: str, allowed: Iterable[str] = ()):
        self.loopback_only = _is_loopback(bound)
        self.allowed = frozenset(_split_host(name)[0] for name in allowed)
        self.local = frozenset() if self.loopback_only else machine_names()

    def host_error(self, host: str) -> str | None:
        name, _ = _split_host(host)
        if _is_loopback(name) or name in self.allowed:
            return None
        if not self.loopback_only and (_is_ip_literal(name) or name in self.local):
            return None
        answers = (
            "a loopback host" if self.loopback_only else "IP addresses and this machine's names"
        )
        return (
            f"this site answers only to {answers}, not {host!r} (start the node with "
            "--allow-host NAME to add a name, say a reverse proxy's)"
        )

    def origin_error(self, origin: str, host: str | None) -> str | None:
        try:
            url = yarl.URL(origin)
        except ValueError:  # not a URL at all: refused below
            url = None
        if url is not None and url.absolute and url.scheme in ("http", "https") and host:
            name, port = _split_host(host)
            origin_name, origin_port = _split_host(url.raw_authority)
            if (origin_name, origin_port) == (name, port):
                return None
        return (
            f"a page from another site ({origin!r}) may not use this site from a browser; "
            "call it from a program, or serve the page through this site"
        )


def _own_names_only(policy: HostPolicy, error_body):
    @web.middleware
    async def middleware(request: web.Request, handler) -> web.StreamResponse:
        """Refuses, with a 403 in the site's error JSON, a request whose Host or Origin
        `policy` refuses."""
        host = request.headers.get("Host")
        if host is not None and (message := policy.host_error(host)) is not None:
            return web.json_response(error_body(message, "forbidden_host"), status=403)
        origin = request.headers.get("Origin")
        if origin is not None and (message := policy.origin_error(origin, host)) is not None:
            return web.json_response(error_body(message, "forbidden_origin"), status=403)
        return await handler(request)

    return middleware


class _QuietClientErrors(logging.Filter):
    """aiohttp logs each request it cannot parse (a malformed header, a line over 8190 bytes,
    over 128 headers), which it answers 400, as an ERROR with a traceback: a client's fault,
    which any client could repeat to fill the log with false alarms. Such a record becomes
    one DEBUG line; the server's own errors stay as they are."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, HttpProcessingError) or not 400 <= error.code < 500:
            return True
        record.msg = f"{record.getMessage()}: {error.code} {error.message}"
        record.args = None
        record.exc_info = record.exc_text = None
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return _server_log.isEnabledFor(logging.DEBUG)


# the log of the HTTP servers' connections (aiohttp's "aiohttp.server" otherwise)
_server_log = logging.getLogger("mesh_node.http.server")
_server_log.addFilter(_QuietClientErrors())


async def start_site(
    app: web.Application,
    host: str,
    port: int,
    shutdown_timeout: float,
    idle_timeout: float = IDLE_TIMEOUT,
) -> tuple[web.AppRunner, int]:
    """Serves `app` on host:port (0 picks a port); returns the runner and the port bound."""
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        shutdown_timeout=shutdown_timeout,
        keepalive_timeout=idle_timeout,  # (also counts from a connection's opening)
        access_log=None,
        logger=_server_log,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, runner.addresses[0][1]


async def stop_site(runner: web.AppRunner, shutdown_timeout: float, what: str) -> None:
    try:
        async with asyncio.timeout(shutdown_timeout + 2.0):
            await runner.cleanup()
    except TimeoutError:
        log.warning("%s did not stop within %.1fs", what, shutdown_timeout + 2.0)


class HttpServer:
    """An app (built by the subclass's `create_app`) served on http://host:port.

    `await start()` binds (port 0 picks a free port; read `port` or `url` afterwards);
    `await stop()` ends open requests and the listener within `shutdown_timeout` seconds.
    """

    what = "the HTTP server"  # for errors and log lines
    service = "http"  # which port it is, for PortInUse
    idle_timeout = IDLE_TIMEOUT

    def __init__(
        self, host: str, port: int, shutdown_timeout: float, allowed_hosts: Iterable[str] = ()
    ):
        self.host = host
        self.port = port
        self.allowed_hosts = tuple(allowed_hosts)
        self.shutdown_timeout = shutdown_timeout
        self.app: web.Application | None = None
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """The server's root, http://host:port."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def create_app(self) -> web.Application:
        raise NotImplementedError

    def error_body(self, message: str, code: str) -> dict:
        """The site's JSON for an error it answers itself (the 403 to a foreign Host or Origin,
        `code` forbidden_host or forbidden_origin)."""
        return {"error": message}

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError(f"{self.what} is already started")
        self.app = self.create_app()
        policy = HostPolicy(self.host, self.allowed_hosts)
        self.app.middlewares.insert(0, _own_names_only(policy, self.error_body))
        try:
            self._runner, self.port = await start_site(
                self.app, self.host, self.port, self.shutdown_timeout, self.idle_timeout
            )
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(self.service, self.what, self.host, self.port) from exc
            raise

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await stop_site(runner, self.shutdown_timeout, self.what)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
