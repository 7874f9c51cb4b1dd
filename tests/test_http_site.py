"""`HostPolicy`: the names the API and console answer to (DNS rebinding) and the pages they
accept requests from (cross-site requests), for binds the HTTP tests do not make (this
machine's other interfaces are never listened on in tests)."""

from __future__ import annotations

import pytest

from mesh_node.http_site import HostPolicy, machine_names


@pytest.mark.parametrize("bound", ["0.0.0.0", "::", "192.0.2.10"])
def test_a_lan_bind_answers_to_addresses_and_this_machines_names_only(bound):
    policy = HostPolicy(bound)
    name = sorted(machine_names())[0]
    for host in ("192.0.2.10:9337", "[2001:db8::1]:9337", "10.0.0.7", "localhost", name):
        assert policy.host_error(host) is None, host
    # a page whose name an attacker rebinds to this machine's address
    for host in ("attacker.example", "attacker.example:9337", f"{name}.attacker.example"):
        message = policy.host_error(host)
        assert message is not None and "--allow-host" in message, host


def test_a_loopback_bind_answers_to_loopback_names_only():
    policy = HostPolicy("127.0.0.1")
    assert policy.host_error("[::1]:80") is None and policy.host_error("app.localhost") is None
    for host in ("10.0.0.7", sorted(machine_names())[0] + ".example"):
        assert "loopback host" in policy.host_error(host)


def test_allowed_names_are_answered_on_any_bind():
    for bound in ("127.0.0.1", "0.0.0.0"):
        policy = HostPolicy(bound, ["Proxy.Example"])
        assert policy.host_error("proxy.example:8443") is None
        assert policy.host_error("other.example") is not None


@pytest.mark.parametrize(
    ("origin", "host", "same"),
    [
        ("http://192.0.2.10:9337", "192.0.2.10:9337", True),
        ("https://proxy.example", "proxy.example", True),
        ("http://[::1]:3131", "[::1]:3131", True),
        ("http://192.0.2.10:8080", "192.0.2.10:9337", False),  # another site on the machine
        ("http://attacker.example", "192.0.2.10:9337", False),
        ("null", "192.0.2.10:9337", False),  # a sandboxed frame, a file:// page
        ("http://[bad", "192.0.2.10:9337", False),
        ("chrome-extension://abc", "abc", False),
        ("http://192.0.2.10:9337", None, False),  # no Host to be the same as
    ],
)
def test_only_the_sites_own_origin_is_accepted(origin, host, same):
    assert (HostPolicy("0.0.0.0").origin_error(origin, host) is None) is same
