"""proto/CONSOLE.md agrees with itself and with the fixtures the tests use."""

import json
import re
from pathlib import Path

from mesh_node.console.client import status_document_problem
from tests.console.scripted_source import ScriptedSource, make_peer

SPEC = (Path(__file__).parents[2] / "proto" / "CONSOLE.md").read_text()


def test_example_document_is_well_formed_and_complete():
    example = json.loads(re.search(r"```json\n(.*?)```", SPEC, re.S).group(1))
    assert status_document_problem(example) is None
    fixture = ScriptedSource([make_peer(0, is_self=True)]).status()
    assert set(example) == set(fixture)
    for peer in example["peers"]:
        assert set(peer) == set(make_peer(0))
    mesh = example["mesh"]
    assert mesh["nodes"] == len(example["peers"])
    assert mesh["nodes"] == sum(mesh[s] for s in ("alive", "suspect", "dead", "left"))


def test_every_peer_field_is_specified():
    table = SPEC[SPEC.index("`PEER` (one member") :]
    for field in make_peer(0):
        assert f"| `{field}` |" in table, field


def test_every_experts_field_is_specified():
    part = SPEC[SPEC.index("**`experts`**") : SPEC.index("**Extending.**")]
    example = json.loads(re.search(r"```\n(\{.*?)```", part, re.S).group(1))["experts"][0]
    for field in example:
        assert f"| `{field}` |" in part, field
    assert set(example["dispatch"]) == {"steps", "remote_calls", "failovers"}
    for field in example["nodes"][0]:
        assert f'"{field}"' in part[part.index("`PLAN_NODE` =") :], field
