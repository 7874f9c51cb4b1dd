"""How many intra-op threads a split model's nodes give their decode-sized work (the host's
decode steps, a peer's decode-sized expert calls) when other nodes of the split run on the
same machine.

A split host waits on the network in every MoE layer. While it waits, its OpenMP team's workers
spin (libgomp keeps them spinning for a while after each parallel region) and hold cores. When
the peers computing its experts run on this machine, those are the cores they need: on a
2-core machine with three nodes, the host's process used 70 ms of CPU per 50 ms token, its
spinning worker leaving the two peers one core between them. So when expert peers share the
machine and this process may use all of its cores (nothing pinned it to some, as taskset or a
cpuset does), each compute process gets an equal share: cores // (1 + co-located peers), at
least one. Peers on other machines, or a pinned process, leave the engine's own choice. The
same holds for a peer's decode-sized expert calls: each thread streams one core's worth of
weights, so on a machine of its own every thread helps (a 5-core node computing 8 OLMoE
experts on one thread took 3.6 ms, 6.7 GB/s), while beside the host and other peers a
second thread's spinning team takes the core they need next.

A thread is worth waking only when it has enough weights to stream (`threads_for_weights`):
waking a sleeping OpenMP worker costs tens to hundreds of microseconds, about what one core
takes to stream 2 MiB. On nodes pinned to two cores each, a built-in-model peer call (one or
two experts, 0.4-0.8 MB of float32) took 357 us on two threads and 136 us on one.
"""

from __future__ import annotations

import os
import socket

from mesh_node.transport.addresses import ip_of

BYTES_PER_THREAD = 2 << 20  # weights one more intra-op thread must have to stream
_LOCAL_CACHE_LIMIT = 1024
_local: dict[str, bool] = {}


def on_this_machine(host: str) -> bool:
    """Whether `host` (an IP address literal) belongs to this machine: a loopback address, or
    one an interface here holds (a socket can bind to it). Anything else: False."""
    known = _local.get(host)
    if known is not None:
        return known
    ip = ip_of(host)
    if ip is None:
        return False
    local = ip.is_loopback
    if not local and not ip.is_unspecified:
        family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                sock.bind((str(ip), 0))
            local = True
        except OSError:
            local = False
    if len(_local) >= _LOCAL_CACHE_LIMIT:
        _local.clear()
    _local[host] = local
    return local


def decode_threads(
    colocated_peers: int,
    all_threads: int,
    *,
    cpus: int | None = None,
    allowed: int | None = None,
) -> int | None:
    """Threads for a split node's decode-sized work, or None for the engine's own choice
    (all threads), given how many other nodes of the split run on this machine.
    `all_threads`: what the engine uses for prefill (every core it may use); `cpus` and
    `allowed` (cores on the machine, cores this process may run on) default to this process's."""
    if colocated_peers <= 0:
        return None
    cpus = cpus or os.cpu_count() or 1
    if allowed is None:
        try:
            allowed = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            allowed = cpus
    if allowed < cpus:
        return None  # pinned: whoever pinned the nodes divided the cores already
    return max(1, min(all_threads, cpus // (1 + colocated_peers)))


def threads_for_weights(nbytes: int, limit: int, per_thread: int = BYTES_PER_THREAD) -> int:
    """Intra-op threads for a decode-sized computation that streams `nbytes` of weights: one
    per `per_thread` bytes, at least one and at most `limit`."""
    if per_thread < 1:
        raise ValueError(f"per_thread must be at least 1 byte, got {per_thread}")
    return max(1, min(limit, -(-nbytes // per_thread)))
