"""The headless-Chromium driver itself: evaluation, bounded waits, clean shutdown."""

import asyncio
import os

import pytest

from tests.browser import chromium
from tests.browser.chromium import Browser, ChromiumUnavailable, JavaScriptError


async def test_evaluate_wait_for_and_console(browser):
    page = await browser.new_page("data:text/html,<title>t</title><p id=x>hello</p>")
    assert await page.evaluate("document.getElementById('x').textContent") == "hello"
    assert await page.evaluate("Promise.resolve({a: [1, 2]})") == {"a": [1, 2]}
    with pytest.raises(JavaScriptError, match="nope is not defined"):
        await page.evaluate("nope.nope")

    await page.evaluate("setTimeout(() => { window.ready = 42 }, 200)")
    assert await page.wait_for("window.ready", timeout=5) == 42

    await page.evaluate("console.log('marker', 7)")
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError, match="marker 7"):
        await page.wait_for("window.never", timeout=0.3)
    assert loop.time() - started < 2


async def test_close_kills_the_browser_and_removes_its_profile(chromium_executable):
    browser = await Browser.launch(chromium_executable)
    page = await browser.new_page()
    assert await page.evaluate("1 + 1") == 2
    assert browser.process.pid in browser.live_processes()
    await browser.close()
    assert browser.process.returncode is not None
    assert not await asyncio.to_thread(os.path.exists, browser.profile)
    assert browser.live_processes() == []  # nothing left running in its process group
    await browser.close()  # idempotent


def test_install_without_apt_is_unavailable_not_silent(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("MESH_NODE_CHROMIUM", raising=False)
    assert chromium.find_chromium() is None
    with pytest.raises(ChromiumUnavailable, match="apt-get is not available"):
        chromium.ensure_chromium()


def test_an_explicit_binary_wins(monkeypatch):
    monkeypatch.setenv("MESH_NODE_CHROMIUM", "/opt/some/chrome")
    assert chromium.ensure_chromium() == "/opt/some/chrome"
