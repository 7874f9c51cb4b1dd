"""Argument types and the checks `mesh-node join` makes before starting anything."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from mesh_node.cli.arguments import byte_size

# flags that keep a node on loopback, should a check that ought to refuse the command regress
# and let it start (ports picked by the system; no mDNS; no API or console)
CONFINED = ["--host", "127.0.0.1", "--port", "0", "--no-mdns", "--no-api", "--no-console"]


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


def test_join_refuses_split_and_shards_together():
    result = subprocess.run(
        [sys.executable, "-m", "mesh_node", "join", "x", *CONFINED, "--moe-split", "--moe-shards"],
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
        [sys.executable, "-m", "mesh_node", "join", "x", *CONFINED, *flags],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert f"{named} --moe-split" in result.stderr


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_join_refuses_an_empty_api_key(how):
    args = [sys.executable, "-m", "mesh_node", "join", "x", *CONFINED]
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
        [sys.executable, "-m", "mesh_node", "join", "x", *CONFINED, "--allow-host", name],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "is not a host name (give the name alone" in result.stderr
