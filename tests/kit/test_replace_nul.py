"""services.kit.protos.replace_nul: every string of a message, however nested, loses its NUL characters."""

from __future__ import annotations

from google.rpc import status_pb2
from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import job_pb2

from services.kit.protos import replace_nul


def test_nul_is_replaced_in_nested_repeated_and_map_strings() -> None:
    update = events_pb2.WorkerJobUpdate(event_id="e", job_id="j", worker_id="w\x00x",
                                        error=status_pb2.Status(code=13, message="a\x00b"))
    event = update.events.add(message="m\x00", reason="ok")
    event.metrics.update({"k\x00": 1.0, "plain": 2.0})
    assert replace_nul(update) == 4
    assert (update.worker_id, update.error.message) == ("w\ufffdx", "a\ufffdb")
    assert (event.message, event.reason) == ("m\ufffd", "ok")
    assert dict(event.metrics) == {"k\ufffd": 1.0, "plain": 2.0}
    assert replace_nul(update) == 0  # nothing left


def test_repeated_strings_and_string_maps() -> None:
    job = job_pb2.Job(id="j")
    job.spec.lora.target_modules.extend(["q_proj", "v\x00proj"])
    job.labels.update({"team\x00": "a\x00b", "ok": "fine"})
    assert replace_nul(job) == 3
    assert list(job.spec.lora.target_modules) == ["q_proj", "v\ufffdproj"]
    assert dict(job.labels) == {"team\ufffd": "a\ufffdb", "ok": "fine"}


def test_find_nul_names_the_first_field_holding_one() -> None:
    from services.kit.protos import find_nul

    update = events_pb2.WorkerJobUpdate(event_id="e", job_id="j")
    assert find_nul(update) is None
    update.events.add(message="fine")
    update.events.add(message="x\x00")
    assert find_nul(update) == "events[1].message"
    job = job_pb2.Job(id="j")
    job.spec.lora.target_modules.extend(["q_proj", "v\x00"])
    assert find_nul(job) == "spec.lora.target_modules[1]"
    job = job_pb2.Job(id="j", labels={"team": "a\x00"})
    assert find_nul(job) == "labels[team]"
    job = job_pb2.Job(id="j", labels={"t\x00": "a"})
    assert find_nul(job) == "labels[t\\x00]"
