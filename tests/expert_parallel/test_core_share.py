"""A split host's share of the cores when expert peers run on the same machine."""

from __future__ import annotations

import os

from mesh_node.expert_parallel.core_share import decode_threads, on_this_machine


def test_decode_threads_split_an_unpinned_machine_between_its_compute_processes():
    # no expert peer here: the engine's own choice
    assert decode_threads(0, 2, cpus=2, allowed=2) is None
    # three nodes on two cores: one thread each (never zero)
    assert decode_threads(2, 2, cpus=2, allowed=2) == 1
    # three nodes on sixteen cores: five each; never more than the engine would use
    assert decode_threads(2, 16, cpus=16, allowed=16) == 5
    assert decode_threads(1, 4, cpus=16, allowed=16) == 4
    # pinned to some cores (taskset, cpusets): whoever pinned divided the cores already
    assert decode_threads(2, 5, cpus=16, allowed=5) is None


def test_decode_threads_default_to_this_process():
    cpus = os.cpu_count() or 1
    expected = max(1, min(8, cpus // 2))
    if hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) < cpus:
        expected = None
    assert decode_threads(1, 8) == expected


def test_which_addresses_are_this_machine():
    assert on_this_machine("127.0.0.1")
    assert on_this_machine("127.0.0.5")  # all of 127/8 is loopback
    assert on_this_machine("::ffff:127.0.0.1")  # as a dual-stack socket reports it
    assert not on_this_machine("0.0.0.0")  # "any address" is no one's address
    assert not on_this_machine("198.51.100.7")  # documentation range, on no interface
    assert not on_this_machine("node-1")  # not an address (in-memory test meshes)
