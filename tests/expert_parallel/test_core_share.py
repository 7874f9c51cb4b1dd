"""A split host's share of the cores when expert peers run on the same machine."""

from __future__ import annotations

import os

import pytest

from mesh_node.expert_parallel.core_share import (
    BYTES_PER_THREAD,
    decode_threads,
    on_this_machine,
    threads_for_weights,
)


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


def test_a_decode_sized_call_wakes_only_threads_with_weights_to_stream():
    mib = 1 << 20
    assert threads_for_weights(0, 8) == 1  # never zero
    assert threads_for_weights(800_000, 8) == 1  # two built-in experts: one thread
    assert threads_for_weights(BYTES_PER_THREAD, 8) == 1
    assert threads_for_weights(BYTES_PER_THREAD + 1, 8) == 2
    assert threads_for_weights(12_582_912, 8) == 6  # one OLMoE expert in bf16
    assert threads_for_weights(8 * 12_582_912, 5) == 5  # never more than allowed
    assert threads_for_weights(10 * mib, 8, per_thread=mib) == 8
    with pytest.raises(ValueError, match="per_thread"):
        threads_for_weights(mib, 8, per_thread=0)


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
