"""A job queued before an upgrade still trains after it: specs resolved by the first release's jobs
service (tests/fixtures/legacy_specs) get the defaults of the fields added since, and nothing else."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message
from tuneforge.v1 import job_pb2

from tuneforge_core.errors import InvalidArgument
from tuneforge_core.spec import (
    ADDED_SINCE_FIRST_RELEASE,
    differing_fields,
    ensure_resolved,
    resolve_spec,
    upgrade_resolved,
)

FIXTURES = Path(__file__).parents[1] / "fixtures" / "legacy_specs"
LEGACY = sorted(FIXTURES.glob("*.binpb"))


def test_the_fixtures_are_there() -> None:
    assert len(LEGACY) >= 9


@pytest.mark.parametrize("path", LEGACY, ids=lambda p: p.stem)
def test_a_legacy_spec_is_upgraded_and_then_resolved(path: Path) -> None:
    legacy = job_pb2.JobSpec.FromString(path.read_bytes())
    with pytest.raises(InvalidArgument):  # what the worker refused before the upgrade path existed
        ensure_resolved(legacy)
    upgraded = upgrade_resolved(legacy)
    ensure_resolved(upgraded)
    assert upgraded == resolve_spec(legacy, allow_user_reward_code=True, require_dataset=False)
    # Only the added fields were filled: without them, the upgraded spec is the legacy one.
    stripped = job_pb2.JobSpec()
    stripped.CopyFrom(upgraded)
    for added in ADDED_SINCE_FIRST_RELEASE:
        *parents, name = added.split(".")
        holder: Message = stripped
        for part in parents:
            holder = getattr(holder, part)
        holder.ClearField(name)
    assert differing_fields(stripped, legacy) == set()


def test_a_resolved_spec_is_returned_as_it_is() -> None:
    spec = resolve_spec(job_pb2.JobSpec(base_model="meta-llama/Llama-3.2-1B", dataset="ds_x",
                                        method=job_pb2.TRAINING_METHOD_SFT), require_dataset=False)
    assert upgrade_resolved(spec) is spec


def test_a_spec_missing_an_old_default_is_not_upgraded() -> None:
    legacy = job_pb2.JobSpec.FromString(LEGACY[0].read_bytes())
    legacy.hyperparameters.ClearField("learning_rate")  # a first-release field: never filled by the worker
    assert upgrade_resolved(legacy) is legacy
    with pytest.raises(InvalidArgument):
        ensure_resolved(legacy)


def test_an_unresolved_spec_is_not_upgraded() -> None:
    draft = job_pb2.JobSpec(base_model="meta-llama/Llama-3.2-1B", dataset="ds_x",
                            method=job_pb2.TRAINING_METHOD_SFT)
    assert upgrade_resolved(draft) is draft


def test_a_new_field_set_to_a_non_default_is_not_overwritten() -> None:
    legacy = job_pb2.JobSpec.FromString(LEGACY[0].read_bytes())
    legacy.hyperparameters.eval_batch_size = 1
    upgraded = upgrade_resolved(legacy)
    assert upgraded is legacy  # set by someone: not a first-release resolution, left for the refusal


def test_the_list_names_real_fields() -> None:
    for path in ADDED_SINCE_FIRST_RELEASE:
        message: Message = job_pb2.JobSpec()
        *parents, name = path.split(".")
        for part in parents:
            message = getattr(message, part)
        assert name in message.DESCRIPTOR.fields_by_name, path


def _paths(descriptor: Descriptor, prefix: str = "") -> list[str]:
    out = []
    for field in descriptor.fields:
        out.append(prefix + field.name)
        nested = field.message_type
        if nested is None or not nested.full_name.startswith("tuneforge"):
            continue
        if not nested.GetOptions().map_entry:
            out += _paths(nested, prefix + field.name + ".")
    return out


def test_every_field_added_since_the_first_release_is_listed() -> None:
    """A new JobSpec field goes into ADDED_SINCE_FIRST_RELEASE, or jobs queued before the upgrade that
    brings it are refused by the worker as unresolved."""
    first = set(json.loads((FIXTURES / "first_release_fields.json").read_text()))
    for path in _paths(job_pb2.JobSpec.DESCRIPTOR):
        parts = path.split(".")
        listed = any(".".join(parts[:n]) in ADDED_SINCE_FIRST_RELEASE for n in range(1, len(parts) + 1))
        assert path in first or listed, f"{path} is new: add it to ADDED_SINCE_FIRST_RELEASE"
