"""A name that looks like an id is refused wherever a name is given: datasets, jobs, deployments and API
keys are each looked up by id or name, ids first, so such a name could make an id stand for another
resource (a job created with a deleted dataset's id would train on the dataset that took that id as its
name)."""

from __future__ import annotations

import pytest
from tuneforge.v1 import identity_pb2, job_pb2

from services.client import InvalidArgument
from tests.auth import org_client
from tests.platform.conftest import ORG, Seeded, chat_file
from tuneforge_core.ids import new_id


def refused_fields(caught: pytest.ExceptionInfo[InvalidArgument]) -> list[str]:
    return [v.field for v in caught.value.violations]


def test_a_name_shaped_like_an_id_is_refused_everywhere(seeded_platform: Seeded) -> None:
    platform = seeded_platform.platform
    taken = seeded_platform.dataset_ids[0]  # an id that exists, as a name
    with org_client(platform.address, platform.data_dir, ORG) as client:
        for name in (taken, new_id("ds"), new_id("job")):
            with pytest.raises(InvalidArgument) as upload:
                client.upload_dataset(chat_file(platform.data_dir.parent / "id-like.jsonl"), name)
            assert refused_fields(upload) == ["metadata.name"]
            assert "must not look like an id" in upload.value.violations[0].description
            with pytest.raises(InvalidArgument) as job:
                client.create_job(job_pb2.JobSpec(base_model="Qwen/Qwen2.5-0.5B", dataset=taken), name=name)
            assert refused_fields(job) == ["name"]
            with pytest.raises(InvalidArgument) as deployment:
                client.create_deployment(seeded_platform.job_ids[0], name=name)
            assert refused_fields(deployment) == ["name"]
            with pytest.raises(InvalidArgument) as key:
                client.create_api_key(name, identity_pb2.ROLE_MEMBER)
            assert refused_fields(key) == ["name"]
        # Names that only resemble one still pass: "ds_small", a name with a digit after the prefix.
        assert client.create_api_key("ds_small", identity_pb2.ROLE_MEMBER).api_key.name == "ds_small"
