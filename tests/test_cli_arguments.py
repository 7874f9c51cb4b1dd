"""Argument types and the checks `mesh-node join` makes before starting anything."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

import pytest

from mesh_node.cli.arguments import byte_size, host_port, listen_host

# flags that keep a node on loopback, should a check that ought to refuse the command regress
# and let it start (ports picked by the system; no mDNS; no API or console)
CONFINED = ["--host", "127.0.0.1", "--port", "0", "--no-mdns", "--no-api", "--no-console"]

MESH_ID = "k" * 32  # a mesh id the node takes: refusals here are of other flags


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1000000", 1_000_000),
        ("512MiB", 512 << 20),
        ("4GiB", 4 << 30),
        ("2.5G", int(2.5 * (1 << 30))),
        ("6 mib", 6 << 20),
        ("1GB", 10**9),
        ("64k", 64 << 10),
    ],
)
def test_sizes_parse_with_binary_and_decimal_units(text, size):
    assert byte_size(text) == size


@pytest.mark.parametrize("text", ["", "12Q", "-1GiB", "0", "GiB", "1.2.3G", "4 GiB extra"])
def test_bad_sizes_say_what_a_size_looks_like(text):
    with pytest.raises(argparse.ArgumentTypeError, match="size"):
        byte_size(text)


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("node-a:7300", ("node-a", 7300)),
        ("10.0.0.2:1", ("10.0.0.2", 1)),
        ("[fd00::1]:7300", ("fd00::1", 7300)),
        ("[fe80::1%eth0]:65535", ("fe80::1%eth0", 65535)),
    ],
)
def test_peer_addresses_parse(text, address):
    assert host_port(text) == address


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("fd00::1:7300", "put an IPv6 address in brackets"),  # (was read as [fd00::1]:7300)
        ("fd00::1", "put an IPv6 address in brackets"),  # (was read as [fd00:]:1)
        ("[fd00::1]x:7300", "must be [IPv6]:PORT"),
        ("[10.0.0.2]:7300", "must be [IPv6]:PORT"),
        ("[]:7300", "must be [IPv6]:PORT"),
        ("[fd00::1:7300", "must be [IPv6]:PORT"),
        ("node-a", "must be HOST:PORT"),
        (":7300", "must be HOST:PORT"),
        ("node-a:0", "out of range (1-65535)"),
        ("node-a:70000", "outside 0-65535"),
        ("host name:7300", "not an IP address or host name"),
        ("bad!host:7300", "not an IP address or host name"),
    ],
)
def test_peer_addresses_that_cannot_be_dialed_are_refused_with_the_reason(text, says):
    """Such a --peer was dialed and failed later with a misleading hint ('a firewall drops
    QUIC silently'); such an --advertise stopped the node with a traceback."""
    with pytest.raises(argparse.ArgumentTypeError, match=re.escape(says)):
        host_port(text)


def test_listen_hosts_take_ipv6_in_brackets_too():
    assert listen_host("[::1]") == listen_host("::1") == "::1"
    assert listen_host("0.0.0.0") == "0.0.0.0" and listen_host("node-a") == "node-a"
    with pytest.raises(argparse.ArgumentTypeError, match="not an IP address or host name"):
        listen_host("bad!host")


@pytest.mark.parametrize(
    "flags",
    [["--advertise", "fd00::1"], ["--advertise", "[::1]:0"], ["--api-host", "[::1"]],
)
def test_join_refuses_addresses_it_cannot_use_before_starting(flags):
    result = subprocess.run(
        [sys.executable, "-m", "mesh_node", "join", MESH_ID, "--ephemeral", *CONFINED, *flags],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Traceback" not in result.stderr, result.stderr[-600:]
    assert result.returncode == 2 and f"argument {flags[0]}" in result.stderr


def test_join_refuses_split_and_shards_together():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mesh_node",
            "join",
            MESH_ID,
            *CONFINED,
            "--moe-split",
            "--moe-shards",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "choose one of --moe-split and --moe-shards" in result.stderr


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--expert-memory", "1GiB"], "--expert-memory need"),
        (["--no-express-lanes"], "--no-express-lanes need"),
        (["--expert-memory", "1GiB", "--no-express-lanes"], "and --no-express-lanes need"),
    ],
)
def test_join_refuses_split_flags_without_moe_split(flags, named):
    result = subprocess.run(
        [sys.executable, "-m", "mesh_node", "join", MESH_ID, *CONFINED, *flags],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert f"{named} --moe-split" in result.stderr


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_join_refuses_an_empty_api_key(how):
    args = [sys.executable, "-m", "mesh_node", "join", MESH_ID, *CONFINED]
    env = None
    if how == "flag":
        args += ["--api-key", ""]
    else:
        import os

        env = {**os.environ, "MESH_NODE_API_KEY": ""}  # e.g. ${KEY} with KEY unset
    result = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2
    assert "the API key is empty" in result.stderr


@pytest.mark.parametrize("name", ["http://proxy.example", "proxy.example:443", "a b", ""])
def test_join_refuses_an_allowed_host_that_is_not_a_name(name):
    result = subprocess.run(
        [sys.executable, "-m", "mesh_node", "join", MESH_ID, *CONFINED, "--allow-host", name],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "is not a host name (give the name alone" in result.stderr


def join(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "MESH_NODE_MESH_ID"}
    return subprocess.run(
        [sys.executable, "-m", "mesh_node", "join", *args, *CONFINED],
        capture_output=True,
        text=True,
        timeout=60,
        env={**environment, **(env or {})},
    )


def test_join_says_where_a_mesh_id_goes_when_none_or_two_are_given():
    result = join()
    assert result.returncode == 2 and "no mesh id: give it as MESH_ID, with --mesh-id-file" in (
        result.stderr
    )
    result = join("a" * 32, env={"MESH_NODE_MESH_ID": "b" * 32})
    assert result.returncode == 2
    assert "MESH_ID and $MESH_NODE_MESH_ID both name a mesh id" in result.stderr


def test_join_reads_the_mesh_id_from_a_file_or_the_environment(tmp_path):
    """Off the command line (which every local user can read): the id is checked as given
    (too short here, so the node stops before starting: proof that it was read)."""
    secret = tmp_path / "mesh-id"
    secret.write_text("too-short\n")
    secret.chmod(0o644)
    result = join("--mesh-id-file", str(secret))
    assert result.returncode == 2 and "at least 16 characters (got 9)" in result.stderr
    assert "may be read by other users" in result.stderr  # 0644: said
    secret.chmod(0o600)
    assert "may be read by other users" not in join("--mesh-id-file", str(secret)).stderr
    result = join(env={"MESH_NODE_MESH_ID": "short-too"})
    assert result.returncode == 2 and "at least 16 characters (got 9)" in result.stderr
    result = join("--mesh-id-file", str(tmp_path / "absent"))
    assert result.returncode == 2 and "cannot read the mesh id from" in result.stderr


def test_join_warns_of_a_mesh_id_a_person_chose():
    result = join("homelab-cluster-2024", "--moe-split", "--moe-shards")  # (refused after)
    assert "was not made by `mesh-node new`" in result.stderr
    generated = subprocess.run(
        [sys.executable, "-m", "mesh_node", "new"], capture_output=True, text=True, timeout=60
    ).stdout.strip()
    result = join(generated, "--moe-split", "--moe-shards")
    assert result.returncode == 2 and "was not made" not in result.stderr


def test_new_saves_the_mesh_id_for_this_user_only_and_never_over_a_file(tmp_path):
    target = tmp_path / "mesh-id"
    command = [sys.executable, "-m", "mesh_node", "new", "--save", str(target)]
    first = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0
    assert target.read_text() == first.stdout and target.stat().st_mode & 0o777 == 0o600
    second = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert second.returncode == 2 and second.stdout == ""
    # (the quickstart run a second time: say how to join the mesh it made the first time)
    assert f"{target} exists already" in second.stderr
    assert f"mesh-node join --mesh-id-file {target}" in second.stderr
    assert target.read_text() == first.stdout  # the first one's id, untouched
    (tmp_path / "folder").mkdir()
    third = subprocess.run(
        [*command[:-1], str(tmp_path / "folder" / "absent" / "id")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert third.returncode == 2 and "cannot save the mesh id to" in third.stderr


def test_join_with_an_empty_mesh_id_says_only_that():
    """`join "$(mesh-node new --save FILE)"` where the save failed: an empty id is refused,
    without a warning that a person chose it."""
    result = join("")
    assert result.returncode == 2 and "at least 16 characters (got 0)" in result.stderr
    assert "was not made" not in result.stderr
