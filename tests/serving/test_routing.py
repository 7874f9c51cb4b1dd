"""Which host (or shard) takes a request: affinity keys and the ranking of hosts."""

from __future__ import annotations

import hashlib

from mesh_node.identity import NodeId
from mesh_node.placement.shards import shard_for_session
from mesh_node.serving.requests import ChatMessage, CompletionRequest
from mesh_node.serving.routing import PREFIX_CHARS, HostLoad, affinity_key, rank_hosts

NODES = [NodeId(hashlib.sha256(bytes([i])).digest()) for i in range(6)]


def chat(*turns: tuple[str, str], user: str | None = None) -> CompletionRequest:
    messages = tuple(ChatMessage(role, content) for role, content in turns)
    return CompletionRequest("m", "r", messages=messages, user=user)


def test_every_turn_of_a_conversation_has_one_key_however_short_it_starts():
    turns = [("system", "Be brief."), ("user", "Capital of France?")]
    keys = set()
    for reply, question in [("Paris.", "And Italy?"), ("Rome.", "And Spain?"), ("Madrid.", "Ok")]:
        keys.add(affinity_key(chat(*turns)))
        turns += [("assistant", reply), ("user", question)]
    opening = b"system\x01Be brief.\x00user\x01Capital of France?"
    assert keys == {b"chat\x00" + hashlib.sha256(opening).digest()}
    # so every turn goes to one shard, whichever shards there are
    shards = [str(n) for n in NODES]
    assert len({shard_for_session(k.hex(), shards) for k in keys}) == 1


def test_conversations_that_start_differently_have_different_keys():
    assert affinity_key(chat(("user", "Hi"))) != affinity_key(chat(("user", "Hello")))
    assert affinity_key(chat(("system", "A"), ("user", "Hi"))) != affinity_key(chat(("user", "Hi")))
    # no user message at all: every message counts
    assert affinity_key(chat(("system", "A"), ("assistant", "B"))) == (
        b"chat\x00" + hashlib.sha256(b"system\x01A\x00assistant\x01B").digest()
    )
    # a long system prompt shared by every conversation: their first questions still count
    system = ("system", "You are a helpful assistant. " * 40)
    assert affinity_key(chat(system, ("user", "Hi"))) != affinity_key(chat(system, ("user", "Yo")))


def test_the_user_field_wins_and_long_prompts_are_cut_to_code_points():
    assert affinity_key(chat(("user", "Hi"), user="alice")) == b"user\x00alice"
    prompt = CompletionRequest("m", "r", prompt="é" * (PREFIX_CHARS + 100))
    assert affinity_key(prompt) == b"prefix\x00" + ("é" * PREFIX_CHARS).encode()
    # a lone surrogate (JSON allows "\ud800") is a key like any other text
    odd = CompletionRequest("m", "r", prompt="a\ud800b", user=None)
    assert affinity_key(odd) == b"prefix\x00a\xed\xa0\x80b"
    assert affinity_key(chat(("user", "\ud800"))) != affinity_key(chat(("user", "\ud801")))


def test_hosts_rank_by_affinity_unless_the_preferred_one_is_clearly_busier():
    key = affinity_key(chat(("user", "Hi")))
    idle = [HostLoad(n, 0) for n in NODES[:4]]
    order = rank_hosts(idle, key)
    assert sorted(order) == sorted(NODES[:4]) and rank_hosts(reversed(idle), key) == order
    preferred = order[0]
    busy = [HostLoad(h.node_id, 3 if h.node_id == preferred else 1) for h in idle]
    assert rank_hosts(busy, key)[0] == preferred  # 2 more in flight: within the slack
    busier = [HostLoad(h.node_id, 4 if h.node_id == preferred else 1) for h in idle]
    assert rank_hosts(busier, key)[0] != preferred
    assert rank_hosts([], key) == []


SESSIONS = [affinity_key(chat(("user", "Hi"), user=f"user-{i}")) for i in range(600)]


def preferred(hosts: list[NodeId], key: bytes) -> NodeId:
    return rank_hosts([HostLoad(n, 0) for n in hosts], key)[0]


def test_sessions_spread_over_hosts_and_a_departed_host_moves_only_its_own():
    """Rendezvous hashing: idle hosts each get about their share of sessions, whatever order
    they are listed in, and when one host goes only its sessions move, over all the others."""
    hosts = NODES
    before = {key: preferred(hosts, key) for key in SESSIONS}
    assert before == {key: preferred(list(reversed(hosts)), key) for key in SESSIONS}
    counts = {n: list(before.values()).count(n) for n in hosts}
    assert all(60 <= c <= 140 for c in counts.values()), counts  # 100 each on average
    gone = hosts[2]
    rest = [n for n in hosts if n != gone]
    after = {key: preferred(rest, key) for key in SESSIONS}
    assert all(after[k] == before[k] for k in SESSIONS if before[k] != gone)
    moved = [after[k] for k in SESSIONS if before[k] == gone]
    assert set(moved) == set(rest)  # spread over the remaining hosts, not piled on one
