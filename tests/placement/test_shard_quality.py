"""The user-facing summary of independent-shard quality: routed scoring, caching, the message."""

from __future__ import annotations

import pytest

from mesh_node.engine.builtin_skills import Example
from mesh_node.engine.catalog import BUILTIN_DIR
from mesh_node.engine.evaluation import PromptScore, Quality, QualityReport
from mesh_node.placement import shard_quality
from mesh_node.placement.shard_quality import (
    ShardQuality,
    routed_quality,
    shard_ids,
    shard_quality_summary,
)
from mesh_node.placement.shards import shard_for_session


def fake_quality(num_shards: int) -> ShardQuality:
    return ShardQuality(
        model="builtin",
        num_shards=num_shards,
        assignment="ranked",
        core_fraction=0.25,
        full=Quality(200, 0.985, 1.01),
        routed=Quality(200, 0.605, 1.91),
        per_shard=tuple(Quality(200, 0.6, 1.9) for _ in range(num_shards)),
        plan_fingerprint="abc",
        seconds=1.0,
    )


def test_routed_quality_scores_each_prompt_on_its_shard():
    examples = [Example("s", f"prompt {i}", "x") for i in range(30)]
    ids = shard_ids(3)
    # shard s answers correctly only the prompts routed to it
    reports = [
        QualityReport(
            tuple(examples),
            tuple(
                PromptScore(shard_for_session(e.prompt, ids) == ids[s], 0.0, 1) for e in examples
            ),
            0.0,
        )
        for s in range(3)
    ]
    assert routed_quality(examples, reports).exact_match == 1.0
    assert all(r.overall.exact_match < 1.0 for r in reports)


@pytest.fixture
def calls(monkeypatch, tmp_path) -> list[int]:
    """Stands in for the measurement (a cache of its own): the shard counts measured."""
    monkeypatch.setenv("MESH_NODE_CACHE", str(tmp_path))
    measured: list[int] = []

    def measure(path, num_shards, **kwargs):
        measured.append(num_shards)
        return fake_quality(num_shards), None, []

    monkeypatch.setattr(shard_quality, "measure_shard_quality", measure)
    return measured


def test_summary_is_measured_once_then_cached(calls, tmp_path):
    first = shard_quality_summary(None, 3)
    again = shard_quality_summary(None, 3)
    other = shard_quality_summary(None, 2)
    assert first == again == fake_quality(3) and other.num_shards == 2
    assert calls == [3, 2]
    files = list((tmp_path / "shard-quality").glob("*.json"))
    assert len(files) == 2
    shard_quality_summary(None, 3, refresh=True)
    assert calls == [3, 2, 3]
    files[0].write_text("{broken")
    shard_quality_summary(None, 3)
    shard_quality_summary(None, 2)
    assert len(calls) == 4  # the damaged entry was measured again


def test_a_measurement_that_needs_more_memory_than_is_free_is_refused_not_made(calls):
    """A shard node measures by loading the whole model, which may be what it cannot hold
    (why it serves a shard): with too little free it refuses; a cached figure still shows."""
    needed = shard_quality.measurement_bytes(BUILTIN_DIR)
    assert needed > 0
    with pytest.raises(MemoryError, match=r"loads the whole model \(.* GiB"):
        shard_quality_summary(None, 3, memory=needed - 1)
    assert calls == []
    measured = shard_quality_summary(None, 3, memory=needed)
    assert calls == [3]
    assert shard_quality_summary(None, 3, memory=1) == measured  # from the cache: no load


def test_describe_shows_shard_and_full_exact_match():
    quality = fake_quality(3)
    assert quality.describe().startswith(
        "independent-shard mode: 3 shards, exact-match 60.5% vs 98.5% full"
    )
    assert ShardQuality.from_json(quality.to_json()) == quality
    assert round(quality.exact_match_loss, 3) == round(1 - 0.605 / 0.985, 3)


def test_a_split_planned_from_other_gate_mass_is_measured_apart(calls):
    """Another ranking of the experts is another split: its figure is not the cached one."""
    hot_first = {0: [0.5, 0.3, 0.1, 0.1], 1: [0.4, 0.3, 0.2, 0.1]}
    hot_last = {0: [0.1, 0.1, 0.3, 0.5], 1: [0.1, 0.2, 0.3, 0.4]}
    shard_quality_summary(None, 2, gate_mass=hot_first)
    shard_quality_summary(None, 2, gate_mass=hot_last)
    shard_quality_summary(None, 2, gate_mass=dict(hot_first))
    shard_quality_summary(None, 2)
    assert calls == [2, 2, 2]


def test_a_cache_that_cannot_be_written_costs_a_warning_not_the_measurement(
    calls, tmp_path, caplog
):
    """(A read-only or full disk: the figure measured is still what the user is shown.)"""
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    quality = shard_quality_summary(None, 3, cache_dir=blocked)
    assert quality == fake_quality(3)
    assert "could not cache the shard mode's quality" in caplog.text
