"""A folder, file or flag the CLI cannot use ends in one `mesh-node: ...` line, never a
traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from tests.test_cli_arguments import CONFINED

MESH = "abcdefghijklmnopqrstuvwxyz"


def mesh_node(home, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mesh_node", *argv],
        env={**os.environ, "MESH_NODE_HOME": str(home), "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=90,
    )


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stderr, result.stderr[-600:]
    assert result.returncode == 2, (result.returncode, result.stderr[-600:])
    assert result.stderr.startswith("mesh-node:"), result.stderr
    return result.stderr


def test_a_home_that_cannot_hold_the_key(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    error = one_line_error(mesh_node(blocker, "id"))
    assert str(blocker) in error and "MESH_NODE_HOME" in error and "--ephemeral" in error
    error = one_line_error(mesh_node("/proc/mesh-node-home", "id"))  # not writable
    assert "/proc/mesh-node-home" in error
    (tmp_path / "home" / "identity.key").mkdir(parents=True, mode=0o700)
    error = one_line_error(mesh_node(tmp_path / "home", "id"))
    assert "identity.key" in error


def test_join_with_a_home_that_cannot_hold_the_key():
    result = mesh_node(
        "/proc/mesh-node-home",
        *("join", MESH, "--client", "--host", "127.0.0.1", "--port", "0"),
        *("--no-api", "--no-console", "--no-mdns"),
    )
    assert "/proc/mesh-node-home" in one_line_error(result)


def test_models_with_a_missing_folder(tmp_path):
    result = mesh_node(tmp_path, "models", "--no-hf-cache", "--path", str(tmp_path / "absent"))
    assert "absent" in one_line_error(result)


@pytest.mark.parametrize(
    "config",
    [
        "[]",
        '{"model_type": "mixtral", "hidden_size": "x", "num_hidden_layers": 2,'
        ' "num_attention_heads": 2, "vocab_size": 10}',
        '{"model_type": "mixtral", "hidden_size": 8, "num_hidden_layers": 2,'
        ' "num_attention_heads": 0, "vocab_size": 10}',
    ],
    ids=["not-an-object", "text-for-a-number", "zero-heads"],
)
def test_models_lists_a_folder_with_a_malformed_config_as_unusable(tmp_path, config):
    folder = tmp_path / "odd-model"
    folder.mkdir()
    (folder / "config.json").write_text(config)
    result = mesh_node(tmp_path, "models", "--no-hf-cache", "--path", str(folder))
    assert "Traceback" not in result.stderr, result.stderr[-600:]
    assert result.returncode == 0 and "unusable" in result.stdout


@pytest.mark.parametrize("address", ["not-an-address", "::1", "300.1.1.1"])
def test_join_refuses_an_mdns_interface_that_is_not_an_ipv4_address(tmp_path, address):
    confined = [flag for flag in CONFINED if flag != "--no-mdns"]  # (mDNS is the point here)
    result = mesh_node(tmp_path, "join", MESH, "--client", *confined, "--mdns-interface", address)
    assert "Traceback" not in result.stderr
    assert result.returncode == 2
    assert "--mdns-interface" in result.stderr and "is not an IPv4 address" in result.stderr


@pytest.mark.parametrize("url", ["http://[", "http://:3131", "http://127.0.0.1:99999"])
def test_status_refuses_a_console_url_it_cannot_use(tmp_path, url):
    result = mesh_node(tmp_path, "status", "--console", url, "--timeout", "2")
    assert "Traceback" not in result.stderr
    assert result.returncode == 2 and "--console" in result.stderr


def test_join_on_a_gpu_this_machine_lacks_is_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = mesh_node(tmp_path, "join", MESH, "--ephemeral", *CONFINED, "--device", "cuda")
    assert result.returncode == 2
    assert "torch sees no CUDA/ROCm device" in one_line_error(result)


def test_a_reader_that_goes_away_ends_the_command_quietly():
    """`mesh-node models | head -1`: the pipe closes under a command still printing."""
    code = (
        "import sys; from mesh_node.cli import main, new;"
        "new.run = lambda args: [print('x' * 99) for _ in range(100_000)] and 0;"
        "sys.exit(main.main(['new']))"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert process.stdout.readline() == b"x" * 99 + b"\n"
    process.stdout.close()
    _, err = process.communicate(timeout=60)
    assert process.returncode == 141
    assert err == b""  # no BrokenPipeError traceback


@pytest.fixture
def busy_tcp_port():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


@pytest.fixture
def busy_udp_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        yield taken.getsockname()[1]


@pytest.mark.parametrize(
    ("service", "flag", "others"),
    [
        ("console", "--console-port", ["--port", "0", "--no-api"]),
        ("API", "--api-port", ["--port", "0", "--no-console"]),
    ],
)
def test_a_taken_http_port_says_whose_it_is_and_which_flag_moves_it(
    tmp_path, busy_tcp_port, service, flag, others
):
    """A second node on one machine (the usual first experiment): the error names the
    server and the flag, not a bare `[Errno 98] error while attempting to bind`."""
    argv = ["join", MESH, "--host", "127.0.0.1", "--no-mdns", *others, flag, str(busy_tcp_port)]
    result = mesh_node(tmp_path, *argv)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-600:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"mesh-node: the {service} server cannot listen on 127.0.0.1:")
    assert f"the port is taken (another mesh-node running?): pick another with {flag}" in line


def test_a_taken_udp_port_says_which_flag_moves_it(tmp_path, busy_udp_port):
    argv = ["join", MESH, *CONFINED[:2], "--port", str(busy_udp_port), *CONFINED[4:]]
    result = mesh_node(tmp_path, *argv)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-600:]
    line = result.stderr.strip().splitlines()[-1]
    assert f"QUIC (udp) cannot listen on 127.0.0.1:{busy_udp_port}: the port is taken" in line
    assert "pick another with --port (0: any free port)" in line


def test_models_with_a_missing_cache_dir(tmp_path):
    """Was: an empty listing, as if the cache held no models."""
    error = one_line_error(mesh_node(tmp_path, "models", "--cache-dir", str(tmp_path / "typo")))
    assert f"{tmp_path / 'typo'} does not exist" in error


def test_join_with_a_missing_cache_dir(tmp_path):
    result = mesh_node(
        tmp_path, "join", MESH, "--ephemeral", *CONFINED, "--cache-dir", str(tmp_path / "typo")
    )
    error = one_line_error(result)
    assert "--cache-dir" in error and f"{tmp_path / 'typo'} does not exist" in error
