"""A small headless-Chromium driver for browser tests, over the DevTools protocol (CDP).

Use it from any test module:

    from tests.browser.chromium import browser, chromium_executable  # noqa: F401  (fixtures)

    async def test_page(browser):
        page = await browser.new_page("http://127.0.0.1:PORT/")
        await page.wait_for("document.querySelectorAll('[data-node-id]').length === 3", 10)

or without fixtures: `async with await Browser.launch(ensure_chromium()) as b: ...`.

`ensure_chromium()` finds a Chromium binary ($MESH_NODE_CHROMIUM, then `chromium` on PATH)
and otherwise installs Debian's `chromium` with apt-get (quiet, bounded by a timeout).
The browser is started with `--remote-debugging-port=0`; the DevTools websocket URL is read
from its stderr, and CDP is spoken over aiohttp's websocket client with a timeout on every
command. `Browser.close()` asks Chromium to quit, then kills its process group and removes
the temporary profile.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Any

import aiohttp
import pytest

INSTALL_TIMEOUT = 240.0
"""Seconds all apt-get runs of an install may take together (about 20 s on a Debian mirror);
below pytest-timeout's 300 s per test, which counts the fixture's setup."""

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--no-proxy-server",
    "--mute-audio",
    "--remote-debugging-address=127.0.0.1",  # DevTools on loopback only
    "--remote-debugging-port=0",
)

_DEVTOOLS_LINE = re.compile(r"DevTools listening on (ws://\S+)")


class ChromiumUnavailable(Exception):
    """No browser, and no way to install one here (apt-get missing, or not root)."""


class ChromiumInstallFailed(Exception):
    """apt-get was there but could not install chromium."""


class CdpError(Exception):
    """A DevTools command failed, timed out, or the connection to the browser closed."""


class JavaScriptError(CdpError):
    """An expression evaluated in the page threw."""


# ---------------------------------------------------------------------------------------
# Finding and installing the browser


def find_chromium() -> str | None:
    override = os.environ.get("MESH_NODE_CHROMIUM")
    if override:
        return override
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    return None


def _apt(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    apt_get = shutil.which("apt-get")
    if apt_get is None:
        raise ChromiumUnavailable("`chromium` is not on PATH and apt-get is not available")
    prefix: list[str] = []
    if os.geteuid() != 0:
        sudo = shutil.which("sudo")
        if sudo is None:
            raise ChromiumUnavailable("`chromium` is not on PATH; installing needs root or sudo")
        prefix = [sudo, "-n"]
    if timeout <= 0:
        raise ChromiumInstallFailed(f"installing chromium took over {INSTALL_TIMEOUT:.0f}s")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = [*prefix, apt_get, "-q", "-o", "DPkg::Lock::Timeout=120", *args]
    try:
        return subprocess.run(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ChromiumInstallFailed(f"`{' '.join(command)}` took over {timeout:.0f}s") from exc


def install_chromium(timeout: float = INSTALL_TIMEOUT) -> str:
    """`apt-get install chromium` (refreshing the package lists once if that fails)."""
    deadline = time.monotonic() + timeout
    install = ["install", "-y", "--no-install-recommends", "chromium"]
    result = _apt(install, deadline - time.monotonic())
    if result.returncode != 0:
        update = _apt(["update"], deadline - time.monotonic())
        if update.returncode != 0:
            raise ChromiumInstallFailed(f"apt-get update failed: {update.stderr.strip()[-2000:]}")
        result = _apt(install, deadline - time.monotonic())
    path = find_chromium()
    if result.returncode != 0 or path is None:
        raise ChromiumInstallFailed(
            f"apt-get install chromium failed (exit {result.returncode}): "
            f"{(result.stderr or result.stdout).strip()[-2000:]}"
        )
    return path


def ensure_chromium(timeout: float = INSTALL_TIMEOUT) -> str:
    """The path of a Chromium binary, installing Debian's package when there is none."""
    return find_chromium() or install_chromium(timeout)


# ---------------------------------------------------------------------------------------
# The DevTools protocol connection


class CdpConnection:
    """One websocket to the browser; commands by id, events by (session, method)."""

    def __init__(self, http: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse):
        self._http = http
        self._ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._listeners: dict[tuple[str | None, str], list[Any]] = collections.defaultdict(list)
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, url: str, timeout: float) -> CdpConnection:
        http = aiohttp.ClientSession()
        try:
            ws = await http.ws_connect(
                url, timeout=aiohttp.ClientWSTimeout(ws_close=timeout), max_msg_size=64 << 20
            )
        except BaseException:
            await http.close()
            raise
        return cls(http, ws)

    def on(self, method: str, callback: Any, session_id: str | None = None) -> None:
        self._listeners[(session_id, method)].append(callback)

    async def send(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        session_id: str | None = None,
        timeout: float = 10.0,
    ) -> dict[str, Any]:
        if self._reader.done():
            raise CdpError(f"{method}: the connection to the browser is closed")
        message_id = next(self._ids)
        message: dict[str, Any] = {"id": message_id, "method": method, "params": params or {}}
        if session_id is not None:
            message["sessionId"] = session_id
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[message_id] = future
        try:
            await self._ws.send_str(json.dumps(message))
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            raise CdpError(f"{method}: no answer from the browser within {timeout}s") from None
        finally:
            self._pending.pop(message_id, None)

    async def _read(self) -> None:
        try:
            async for frame in self._ws:
                if frame.type != aiohttp.WSMsgType.TEXT:
                    break
                message = json.loads(frame.data)
                if "id" in message:
                    future = self._pending.get(message["id"])
                    if future is None or future.done():
                        continue
                    if "error" in message:
                        future.set_exception(CdpError(f"{message['error']}"))
                    else:
                        future.set_result(message.get("result", {}))
                    continue
                key = (message.get("sessionId"), message.get("method", ""))
                for callback in self._listeners.get(key, ()):
                    callback(message.get("params", {}))
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(CdpError("the connection to the browser closed"))

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._ws.close(), 5.0)
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader
        await self._http.close()


# ---------------------------------------------------------------------------------------
# Browser and page


class Page:
    """A browser tab attached through a flat CDP session."""

    def __init__(self, cdp: CdpConnection, target_id: str, session_id: str):
        self._cdp = cdp
        self.target_id = target_id
        self.session_id = session_id
        self.console: collections.deque[str] = collections.deque(maxlen=200)
        """Recent console messages and uncaught exceptions, for failure messages."""
        cdp.on("Runtime.consoleAPICalled", self._on_console, session_id)
        cdp.on("Runtime.exceptionThrown", self._on_exception, session_id)

    def _on_console(self, params: dict[str, Any]) -> None:
        args = params.get("args", [])
        text = " ".join(str(a.get("value", a.get("description", ""))) for a in args)
        self.console.append(f"console.{params.get('type', 'log')}: {text}")

    def _on_exception(self, params: dict[str, Any]) -> None:
        details = params.get("exceptionDetails", {})
        exception = details.get("exception", {})
        self.console.append(f"uncaught: {exception.get('description') or details.get('text')}")

    async def send(self, method: str, params: dict[str, Any] | None = None, timeout: float = 10.0):
        return await self._cdp.send(method, params, session_id=self.session_id, timeout=timeout)

    async def goto(self, url: str, timeout: float = 10.0) -> None:
        """Navigate and wait until the document has loaded."""
        result = await self.send("Page.navigate", {"url": url}, timeout)
        if result.get("errorText"):
            raise CdpError(f"cannot load {url}: {result['errorText']}")
        await self.wait_for("document.readyState === 'complete'", timeout)

    async def evaluate(self, expression: str, timeout: float = 5.0) -> Any:
        """The value of a JS expression (promises awaited), returned by value (JSON)."""
        result = await self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
            timeout,
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            description = details.get("exception", {}).get("description") or details.get("text")
            raise JavaScriptError(f"{expression!r} threw: {description}")
        return result.get("result", {}).get("value")

    async def wait_for(self, expression: str, timeout: float = 10.0, interval: float = 0.05):
        """Poll a JS expression until it is truthy; return its value. Bounded by `timeout`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last: Any = None
        while True:
            remaining = deadline - loop.time()
            try:
                last = await self.evaluate(expression, timeout=max(0.5, remaining))
                if last:
                    return last
            except JavaScriptError as exc:
                last = exc
            if loop.time() + interval > deadline:
                console = "\n  ".join(self.console) or "(empty)"
                raise TimeoutError(
                    f"waited {timeout}s for {expression!r}; last value {last!r}; "
                    f"page console:\n  {console}"
                )
            await asyncio.sleep(interval)

    async def screenshot(self, width: int = 1400, height: int = 900) -> bytes:
        """A PNG of the page (to look at a failing test: write it to a file)."""
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
        result = await self.send("Page.captureScreenshot", {"format": "png"}, timeout=20)
        return base64.b64decode(result["data"])

    async def close(self) -> None:
        with contextlib.suppress(CdpError):
            await self._cdp.send("Target.closeTarget", {"targetId": self.target_id}, timeout=5)


class Browser:
    """A headless Chromium process with its own temporary profile."""

    def __init__(
        self,
        process: asyncio.subprocess.Process,
        profile: str,
        cdp: CdpConnection,
        stderr_tail: collections.deque[str],
        stderr_task: asyncio.Task[None],
    ):
        self.process = process
        self.profile = profile
        self.cdp = cdp
        self.stderr_tail = stderr_tail
        self._stderr_task = stderr_task
        self._closed = False

    @classmethod
    async def launch(
        cls, executable: str | None = None, *, timeout: float = 30.0, extra_args: tuple = ()
    ) -> Browser:
        executable = executable or ensure_chromium()
        profile = tempfile.mkdtemp(prefix="mesh-node-chromium-")
        process = await asyncio.create_subprocess_exec(
            executable,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            *extra_args,
            "about:blank",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # its own process group: killed as one in close()
        )
        tail: collections.deque[str] = collections.deque(maxlen=100)
        try:
            async with asyncio.timeout(timeout):
                url = await cls._read_devtools_url(process, tail)
            cdp = await CdpConnection.open(url, timeout)
        except BaseException as exc:
            await cls._kill(process)
            shutil.rmtree(profile, ignore_errors=True)
            if isinstance(exc, TimeoutError):
                raise CdpError(
                    f"chromium did not print its DevTools URL within {timeout}s: "
                    + " | ".join(tail)
                ) from None
            raise
        stderr_task = asyncio.create_task(cls._drain(process, tail))
        return cls(process, profile, cdp, tail, stderr_task)

    @staticmethod
    async def _read_devtools_url(
        process: asyncio.subprocess.Process, tail: collections.deque[str]
    ) -> str:
        assert process.stderr is not None
        while True:
            line = (await process.stderr.readline()).decode(errors="replace")
            if not line:
                raise CdpError(f"chromium exited before listening: {' | '.join(tail)}")
            tail.append(line.rstrip())
            if match := _DEVTOOLS_LINE.search(line):
                return match.group(1)

    @staticmethod
    async def _drain(process: asyncio.subprocess.Process, tail: collections.deque[str]) -> None:
        assert process.stderr is not None
        while line := await process.stderr.readline():
            tail.append(line.decode(errors="replace").rstrip())

    @staticmethod
    async def _kill(process: asyncio.subprocess.Process) -> None:
        """SIGTERM the browser's process group, then SIGKILL whatever is left of it."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)  # the group this process leads, nothing else
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), 5.0)

    def live_processes(self) -> list[int]:
        """Pids still running in the browser's process group (Linux /proc; zombies, which
        only wait for PID 1 to reap them, do not count)."""
        alive = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as file:
                    fields = file.read().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[2]) == self.process.pid and fields[0] != "Z":
                alive.append(int(entry))
        return alive

    async def new_page(self, url: str | None = None, timeout: float = 10.0) -> Page:
        created = await self.cdp.send("Target.createTarget", {"url": "about:blank"})
        target_id = created["targetId"]
        attached = await self.cdp.send(
            "Target.attachToTarget", {"targetId": target_id, "flatten": True}
        )
        page = Page(self.cdp, target_id, attached["sessionId"])
        await page.send("Runtime.enable")
        await page.send("Page.enable")
        if url is not None:
            await page.goto(url, timeout)
        return page

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(CdpError):
            await self.cdp.send("Browser.close", timeout=5.0)
        await self.cdp.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.process.wait(), 5.0)
        await self._kill(self.process)  # also stray children left in its process group
        self._stderr_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._stderr_task
        shutil.rmtree(self.profile, ignore_errors=True)

    async def __aenter__(self) -> Browser:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


# ---------------------------------------------------------------------------------------
# pytest fixtures (import them into a test module or conftest to use them)


@pytest.fixture(scope="session")
def chromium_executable() -> str:
    """A Chromium binary, installed with apt-get on first use if needed."""
    try:
        return ensure_chromium()
    except ChromiumUnavailable as exc:
        pytest.skip(f"browser tests need headless Chromium: {exc}")


@pytest.fixture
async def browser(chromium_executable: str):
    """A fresh headless Chromium for one test; closed (and its profile removed) after it."""
    async with await Browser.launch(chromium_executable) as launched:
        yield launched
