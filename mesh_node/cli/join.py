"""`mesh-node join <mesh-id>`: run a node in a mesh until interrupted."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from mesh_node.cli.arguments import (
    byte_size,
    host_name,
    host_port,
    ipv4_address,
    listen_host,
    port_number,
)
from mesh_node.engine.catalog import check_cache_folder
from mesh_node.engine.errors import EngineError
from mesh_node.expert_parallel.coordinator import ExpertParallelConfig
from mesh_node.identity import IdentityError, MeshSecret, default_home, looks_generated
from mesh_node.node import Node, NodeConfig
from mesh_node.serving.hosting import HostingConfig
from mesh_node.transport.addresses import PortInUse


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "join",
        help="join a mesh and serve until interrupted",
        description=(
            "Start a node in the mesh named by MESH_ID and keep it running until SIGINT or "
            "SIGTERM, when it leaves cleanly. Make a mesh id with `mesh-node new`."
        ),
    )
    parser.add_argument(
        "mesh_id",
        metavar="MESH_ID",
        nargs="?",
        help="the mesh's shared secret (from `mesh-node new`); never sent on the wire. On a "
        "machine others log in to, give it with --mesh-id-file or $MESH_NODE_MESH_ID instead: "
        "a command line is visible to every local user",
    )
    parser.add_argument(
        "--mesh-id-file",
        metavar="FILE",
        help="read the mesh id from FILE (its first line), e.g. one `mesh-node new --save FILE` "
        "wrote; a warning says so when others may read the file",
    )
    parser.add_argument(
        "--peer",
        metavar="HOST:PORT",
        action="append",
        type=host_port,
        default=[],
        help="address of a node already in the mesh to join through (repeatable; an IPv6 "
        "address in brackets: [fd00::1]:7300); needed where LAN discovery (mDNS) cannot reach",
    )
    parser.add_argument(
        "--port",
        type=port_number,
        default=7300,
        help="UDP port for QUIC connections from peers (default: %(default)s; 0 picks one)",
    )
    parser.add_argument(
        "--host",
        default="0.0.0.0",
        type=listen_host,
        help="address to listen on (default: %(default)s, all IPv4 interfaces; :: for all "
        "IPv6 and IPv4 interfaces, e.g. on a machine with IPv6 addresses only)",
    )
    parser.add_argument(
        "--model",
        metavar="M",
        action="append",
        default=[],
        help="a model this node offers to host: builtin (the built-in model), a local Hugging "
        "Face model folder, or a Hugging Face repo id (taken from the local cache, else "
        "downloaded) (repeatable; default: builtin). The mesh elects one or more hosts per "
        "model among the nodes that have it and enough free memory",
    )
    parser.add_argument(
        "--cache-dir",
        metavar="DIR",
        type=Path,
        default=None,
        help="the Hugging Face cache (an existing folder) a --model repo id is taken from, "
        "and downloaded into when missing: give the folder `mesh-node models --cache-dir` "
        "listed; a Hugging Face home (HF_HOME) stands for the cache in its hub folder "
        "(default: the hub cache: HF_HUB_CACHE, else $HF_HOME/hub, else "
        "~/.cache/huggingface/hub)",
    )
    parser.add_argument(
        "--client",
        action="store_true",
        help="never host a model (any --model is ignored); still answer API requests by "
        "passing them to hosts",
    )
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="where hosted models run (default: %(default)s, a GPU when torch sees one)",
    )
    parser.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="weights' precision (default: %(default)s: float32 for tiny models on any device; "
        "over 100M parameters bfloat16 on CPU and the checkpoint's half type on GPU)",
    )
    parser.add_argument(
        "--moe-split",
        action="store_true",
        help="expert parallelism: offer this node's Mixture-of-Experts models split across the "
        "mesh, each node holding a share of the experts in proportion to its memory (exact: "
        "same output as one node holding everything). A model is split when any node offers "
        "it so (if the memory offered cannot hold its experts within 10 minutes, its host "
        "runs it whole where it has room); start every node of the mesh with the same --dtype "
        "(named, when GPUs and CPUs mix: auto picks by device)",
    )
    parser.add_argument(
        "--moe-shards",
        action="store_true",
        help="independent-shard mode (for slow links; not exact): serve this node's "
        "Mixture-of-Experts models as one shard each: the trunk, the hottest experts and a "
        "share of the others, the router limited to them; sessions are hash-routed to shards "
        "and no traffic crosses nodes per token. The measured quality loss is logged",
    )
    parser.add_argument(
        "--no-express-lanes",
        action="store_true",
        help="with --moe-split: make the expert calls this node sends or answers over QUIC "
        "(give it to every node of the split to turn lanes off). By default a host sends a "
        "decode step's calls as single sealed UDP datagrams on an express lane, which the "
        "peer grants over QUIC and answers from an ephemeral UDP port (~0.8 ms less per "
        "call on the 2-core test VM); where that port is blocked, calls go back to QUIC by "
        "themselves",
    )
    parser.add_argument(
        "--expert-memory",
        metavar="SIZE",
        type=byte_size,
        default=None,
        help="with --moe-split: memory this node offers for experts of each split model, e.g. "
        "4GiB (default: 80%% of the free memory where experts load at start, the GPU's with a "
        "GPU, else the RAM's, shared among the split models)",
    )
    parser.add_argument(
        "--advertise",
        metavar="HOST:PORT",
        action="append",
        type=host_port,
        default=[],
        help="address peers should use to reach this node (repeatable; default: the --host "
        "address, or when listening on all interfaces up to 8 of this machine's IPv4 "
        "addresses, then with --host :: its global and unique-local IPv6 ones, with the port "
        "bound); set it behind NAT or in containers",
    )
    parser.add_argument(
        "--api-port",
        type=port_number,
        default=9337,
        help="TCP port of the OpenAI-compatible API (default: %(default)s; 0 picks one)",
    )
    parser.add_argument(
        "--api-host",
        default="127.0.0.1",
        type=listen_host,
        help="address the API listens on (default: %(default)s, this machine only; use "
        "0.0.0.0 to serve the LAN, ideally with --api-key)",
    )
    parser.add_argument(
        "--api-key",
        metavar="KEY",
        default=os.environ.get("MESH_NODE_API_KEY"),
        help="require `Authorization: Bearer KEY` on every API request (default: "
        "$MESH_NODE_API_KEY if set, else no key; an empty key is refused)",
    )
    parser.add_argument("--no-api", action="store_true", help="do not serve the API")
    parser.add_argument(
        "--console-port",
        type=port_number,
        default=3131,
        help="TCP port of the status console and its API (default: %(default)s; 0 picks one)",
    )
    parser.add_argument(
        "--console-host",
        default="127.0.0.1",
        type=listen_host,
        help="address the console listens on (default: %(default)s, this machine only; the "
        "console has no authentication, so expose it only on trusted networks)",
    )
    parser.add_argument(
        "--allow-host",
        metavar="NAME",
        action="append",
        type=host_name,
        default=[],
        help="a name the API and console also answer to in the Host header, e.g. a reverse "
        "proxy's public name (repeatable). Without it they answer only to loopback names when "
        "bound to loopback, else also to IP addresses and this machine's hostname: a web page "
        "whose name is made to resolve here gets 403, as does a request from another site's page",
    )
    parser.add_argument("--no-console", action="store_true", help="do not serve the status console")
    parser.add_argument(
        "--no-mdns",
        action="store_true",
        help="do not announce or look for nodes on the LAN with mDNS (use --peer instead)",
    )
    parser.add_argument(
        "--mdns-interface",
        metavar="ADDR",
        type=ipv4_address,
        action="append",
        default=[],
        help="IPv4 address of an interface to run mDNS on (repeatable; default: all interfaces)",
    )
    parser.add_argument(
        "--name", default="", help="a human-readable name shown to peers (default: hostname)"
    )
    parser.add_argument(
        "--ephemeral",
        action="store_true",
        help="use a throwaway node key instead of the one kept in $MESH_NODE_HOME "
        "(default ~/.mesh-node)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="how much to log to stderr (default: %(default)s)",
    )
    parser.set_defaults(run=run)
    return parser


def _mesh_id(args: argparse.Namespace) -> str:
    """The mesh id from exactly one of MESH_ID, --mesh-id-file and $MESH_NODE_MESH_ID;
    ValueError saying what to give otherwise."""
    environment = os.environ.get("MESH_NODE_MESH_ID")
    given = [
        name
        for name, value in (
            ("MESH_ID", args.mesh_id),
            ("--mesh-id-file", args.mesh_id_file),
            ("$MESH_NODE_MESH_ID", environment),
        )
        if value is not None
    ]
    if len(given) != 1:
        what = "no mesh id" if not given else f"{' and '.join(given)} both name a mesh id"
        raise ValueError(
            f"{what}: give it as MESH_ID, with --mesh-id-file FILE or in $MESH_NODE_MESH_ID "
            "(exactly one; make one with `mesh-node new`)"
        )
    if args.mesh_id is not None:
        return args.mesh_id
    if environment is not None:
        return environment
    path = Path(args.mesh_id_file)
    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the mesh id from {path}: {exc}") from None
    if mode & 0o044:
        print(
            f"mesh-node: warning: {path} may be read by other users, and anyone who reads it "
            f"can join this mesh (chmod 600 {path})",
            file=sys.stderr,
        )
    lines = text.splitlines()
    return lines[0] if lines else ""


def run(args: argparse.Namespace) -> int:
    try:
        args.mesh_id = _mesh_id(args)
        MeshSecret(args.mesh_id)  # (a mesh id that cannot be one: say so before warning)
    except (ValueError, IdentityError) as exc:
        print(f"mesh-node: {exc}", file=sys.stderr)
        return 2
    if not looks_generated(args.mesh_id):
        print(
            "mesh-node: warning: this mesh id was not made by `mesh-node new`. If a person "
            "chose it, anyone who sees this mesh's LAN announcements or reaches one of its "
            "nodes can test guesses offline; a mesh id from `mesh-node new` cannot be guessed",
            file=sys.stderr,
        )
    if args.moe_split and args.moe_shards:
        print("mesh-node: choose one of --moe-split and --moe-shards", file=sys.stderr)
        return 2
    if args.device != "auto":  # (a GPU asked for on a machine without one: say so now)
        from mesh_node.engine.loading import resolve_device

        try:
            resolve_device(args.device)
        except ValueError as exc:
            print(f"mesh-node: {exc}", file=sys.stderr)
            return 2
    split_only = [
        flag
        for flag, given in (
            ("--expert-memory", args.expert_memory is not None),
            ("--no-express-lanes", args.no_express_lanes),
        )
        if given
    ]
    if split_only and not args.moe_split:
        print(f"mesh-node: {' and '.join(split_only)} need --moe-split", file=sys.stderr)
        return 2
    if args.cache_dir is not None:
        try:
            args.cache_dir = check_cache_folder(args.cache_dir)
        except EngineError as exc:
            print(f"mesh-node: --cache-dir: {exc}", file=sys.stderr)
            return 2
    if args.api_key is not None and not args.api_key.strip():
        # e.g. MESH_NODE_API_KEY=${KEY} with KEY unset: an open API is not what was asked for
        print(
            "mesh-node: the API key is empty (--api-key or MESH_NODE_API_KEY): give a key, "
            "or leave both unset for an API without one",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("quic").setLevel(logging.WARNING)
    try:
        config = NodeConfig(
            mesh_id=args.mesh_id,
            name=args.name,
            host=args.host,
            port=args.port,
            peers=tuple(args.peer),
            advertise=tuple(args.advertise),
            home=default_home(),
            ephemeral=args.ephemeral,
            models=tuple(args.model),
            model_cache=args.cache_dir,
            client=args.client,
            experts=ExpertParallelConfig(
                enabled=args.moe_split,
                shards=args.moe_shards,
                memory=args.expert_memory,
                lanes=not args.no_express_lanes,
            ),
            hosting=HostingConfig(
                device=args.device, dtype=None if args.dtype == "auto" else args.dtype
            ),
            mdns=not args.no_mdns,
            mdns_interfaces=tuple(args.mdns_interface),
            console_host=args.console_host,
            console_port=None if args.no_console else args.console_port,
            api_host=args.api_host,
            api_port=None if args.no_api else args.api_port,
            api_key=args.api_key,
            allowed_hosts=tuple(args.allow_host),
        )
        node = Node(config)
    except IdentityError as exc:
        print(f"mesh-node: {exc}", file=sys.stderr)
        return 2
    print(f"node {node.node_id.short}  ({node.node_id})", flush=True)
    try:
        asyncio.run(node.run_until_signal(announce=print))
    except EngineError as exc:  # e.g. a --model that cannot be found or fetched
        print(f"mesh-node: {exc}", file=sys.stderr)
        return _exit_now(2)
    except PortInUse as exc:  # (another mesh-node on this machine, most often)
        flag = PORT_FLAGS.get(exc.service, "")
        hint = f": pick another with {flag} (0: any free port)" if flag else ""
        print(f"mesh-node: {exc} (another mesh-node running?){hint}", file=sys.stderr)
        return _exit_now(1)
    except OSError as exc:
        print(f"mesh-node: {exc}", file=sys.stderr)
        return _exit_now(1)
    return _exit_now(0)


PORT_FLAGS = {"quic": "--port", "api": "--api-port", "console": "--console-port"}


def _exit_now(code: int) -> int:
    """The node has stopped cleanly (peers told, connections closed, models unloaded): leave
    without the interpreter's finalization. torch's native thread pools may still be winding
    down in background threads then, and tearing the runtime down under them aborts the
    process now and then ("terminate called without an active exception", exit code -6)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
