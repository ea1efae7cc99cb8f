"""Serving a finished job's model end to end: the platform as `tuneforge up` runs it (one worker, a tiny
model trained for real), DeploymentService through the Python client, and the OpenAI-compatible endpoint
through the official `openai` client."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from tuneforge.v1 import deployment_service_pb2 as dpb
from tuneforge.v1 import job_pb2

from services.client import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, TuneForgeClient
from services.platform.supervisor import Platform
from tests.auth import make_key
from tests.e2e.conftest import lora_spec, start_platform, tiny_assets, wait_final  # noqa: F401 (fixture)
from trainer_worker.tiny import write_synthetic_chat_dataset

pytestmark = pytest.mark.slow

ORG, OTHER = "serving", "intruder"


def runner_pids(data_dir: Path, deployment_id: str = "") -> list[int]:
    """Model processes started for this platform (for one deployment), from /proc."""
    folder = data_dir / "serving" / deployment_id if deployment_id else data_dir
    marker = str(folder.resolve())
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in cmdline]
        if "services.serving.runner" in args and any(marker in a for a in args):
            pids.append(int(entry.name))
    return pids


def check_tokens(answer: Any) -> int:
    assert answer.usage is not None
    return int(answer.usage.completion_tokens)


def wait_deployment(client: TuneForgeClient, ref: str, timeout_s: float = 120) -> dpb.Deployment:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        deployment = client.get_deployment(ref)
        if deployment.state != dpb.DEPLOYMENT_STATE_PENDING:
            return deployment
        time.sleep(0.3)
    raise AssertionError(f"deployment {ref} stayed PENDING")


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory, tiny_assets: tuple[Path, Path]) -> Iterator[Platform]:  # noqa: F811
    p = start_platform(tmp_path_factory.mktemp("serving"), workers=1, model=tiny_assets[0])
    try:
        yield p
    finally:
        p.stop()
    # No model process outlives the platform.
    assert runner_pids(p.data_dir) == []


def test_a_finished_job_is_served_behind_an_openai_endpoint(
    platform: Platform, tiny_assets: tuple[Path, Path], tmp_path: Path  # noqa: F811
) -> None:
    model, _ = tiny_assets
    key = make_key(platform.address, platform.data_dir, ORG, "member")
    other_key = make_key(platform.address, platform.data_dir, OTHER, "admin")
    with TuneForgeClient(platform.address, api_key=key) as client:
        # 100 rows (the least a dataset may have), 2 epochs: the tiny model learns to end on <|im_end|>.
        small = write_synthetic_chat_dataset(tmp_path / "chat.jsonl", 100)
        ds = client.upload_dataset(small, "chat", request_id=str(uuid.uuid4())).dataset
        job = client.create_job(lora_spec(model, ds.id, epochs=2), name="tiny")
        # A job that has not SUCCEEDED (queued or running) is refused, and so is an unknown one.
        with pytest.raises(FailedPrecondition) as refused:
            client.create_deployment(job.id)
        assert refused.value.reason == "JOB_STATE_CONFLICT"
        with pytest.raises(NotFound):
            client.create_deployment("no-such-job")
        final = wait_final(client, job.id)
        assert final.state == job_pb2.JOB_STATE_SUCCEEDED, final.error

        # Idempotent by request_id; names are unique in the organization.
        created = client.create_deployment("tiny", name="tiny-chat", request_id="deploy-1")
        assert created.state == dpb.DEPLOYMENT_STATE_PENDING and created.model == "tiny-chat"
        assert client.create_deployment("tiny", name="tiny-chat", request_id="deploy-1").id == created.id
        with pytest.raises(AlreadyExists):
            client.create_deployment("tiny", name="tiny-chat")
        with pytest.raises(InvalidArgument) as bad_target:
            client.create_deployment("tiny", target=7)  # type: ignore[arg-type]
        assert bad_target.value.violations[0].field == "target"
        with pytest.raises(InvalidArgument) as no_merged:
            client.create_deployment("tiny", merged=True)
        assert [v.field for v in no_merged.value.violations] == ["merged"]
        vllm = client.create_deployment("tiny", name="tiny-vllm", target=dpb.DEPLOYMENT_TARGET_VLLM)
        doomed = client.create_deployment("tiny", name="tiny-doomed")

        deployment = wait_deployment(client, created.id)
        assert deployment.state == dpb.DEPLOYMENT_STATE_READY, deployment.error
        check = deployment.check
        assert check.loaded and check.generated and check.stopped_at_end_of_turn, check
        assert check.end_of_turn_token == "<|im_end|>" and check.prompt and check.duration.ToTimedelta()
        assert deployment.endpoint.startswith("http://") and deployment.endpoint.endswith("/v1")
        assert runner_pids(platform.data_dir, created.id)

        # The official OpenAI client, non-streaming then streaming.
        ai = openai.OpenAI(base_url=deployment.endpoint, api_key=key, max_retries=0)
        assert "tiny-chat" in [m.id for m in ai.models.list().data]
        messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": check.prompt}]
        answer = ai.chat.completions.create(model="tiny-chat", messages=messages,
                                            max_tokens=64, temperature=0)
        choice = answer.choices[0]
        assert choice.finish_reason == "stop" and choice.message.role == "assistant"
        assert choice.message.content == check.answer  # the same greedy answer as the self-check
        assert answer.usage is not None and answer.usage.completion_tokens > 0
        chunks = list(ai.chat.completions.create(model="tiny-chat", messages=messages,
                                                 max_tokens=64, temperature=0, stream=True))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == check.answer and len(chunks) >= 3
        assert chunks[-1].choices[0].finish_reason == "stop"
        stop = check.answer[3:5]
        cut = ai.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=64, temperature=0,
                                         stop=[stop])
        assert cut.choices[0].message.content == check.answer[: check.answer.index(stop)]
        assert cut.choices[0].finish_reason == "stop"
        counted = list(ai.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=64,
                                                  temperature=0, stream=True,
                                                  stream_options={"include_usage": True}))
        assert counted[-1].usage is not None and counted[-1].usage.completion_tokens == check_tokens(answer)
        short = ai.chat.completions.create(model="tiny-chat", messages=messages,
                                           max_tokens=1, temperature=0.7, top_p=0.9)
        assert short.choices[0].finish_reason in ("length", "stop")
        assert short.usage is not None and short.usage.completion_tokens == 1

        # The CLI: `chat --message` reuses the READY deployment and prints the answer; `deployments list`.
        from typer.testing import CliRunner

        from services.cli.main import app

        cli = CliRunner(env={"TUNEFORGE_API_KEY": key})
        said = cli.invoke(app, ["chat", "tiny", "--message", check.prompt, "--max-tokens", "64",
                                "--address", platform.address])
        assert said.exit_code == 0, said.output
        assert said.stdout.strip() == check.answer.strip()
        listed_json = cli.invoke(app, ["deployments", "list", "--json", "--address", platform.address])
        assert listed_json.exit_code == 0, listed_json.output
        assert [d["id"] for d in json.loads(listed_json.stdout)["deployments"]] == \
            [doomed.id, vllm.id, created.id]
        # `deployments create --name`: the name requests send as `model`, READY before it returns.
        made = cli.invoke(app, ["deployments", "create", "tiny", "--name", "tiny-cli", "--json",
                                "--address", platform.address])
        assert made.exit_code == 0, made.output
        shown = json.loads(made.stdout)
        assert shown["state"] == "DEPLOYMENT_STATE_READY" and shown["model"] == "tiny-cli", shown
        again = ai.chat.completions.create(model="tiny-cli", messages=messages, max_tokens=64, temperature=0)
        assert again.choices[0].message.content == check.answer
        gone = cli.invoke(app, ["deployments", "delete", "tiny-cli", "--address", platform.address],
                          input="n\n")
        assert gone.exit_code == 1, gone.output  # asked first, and told no
        gone = cli.invoke(app, ["deployments", "delete", "tiny-cli", "--yes", "--address", platform.address])
        assert gone.exit_code == 0, gone.output

        # Auth: no key is 401, another organization's key finds no such model (404).
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=deployment.endpoint, api_key="not-a-key", max_retries=0).models.list()
        intruder = openai.OpenAI(base_url=deployment.endpoint, api_key=other_key, max_retries=0)
        assert intruder.models.list().data == []
        with pytest.raises(openai.NotFoundError):
            intruder.chat.completions.create(model="tiny-chat", messages=messages)
        # Bad fields are 400s naming the field, never 500s.
        with pytest.raises(openai.BadRequestError) as two:
            ai.chat.completions.create(model="tiny-chat", messages=messages, n=2)
        assert two.value.param == "n"
        with pytest.raises(openai.BadRequestError) as hot:
            ai.chat.completions.create(model="tiny-chat", messages=messages,
                                       temperature=5)
        assert hot.value.param == "temperature"
        with pytest.raises(openai.NotFoundError):
            ai.chat.completions.create(model="nope", messages=messages)
        raw = urllib.request.Request(f"{deployment.endpoint}/chat/completions", data=b"{not json",
                                     headers={"Authorization": f"Bearer {key}"}, method="POST")
        with pytest.raises(urllib.error.HTTPError) as not_json:
            urllib.request.urlopen(raw, timeout=10)
        assert not_json.value.code == 400 and "error" in json.loads(not_json.value.read())
        no_key = urllib.request.Request(f"{deployment.endpoint}/models")
        with pytest.raises(urllib.error.HTTPError) as unauthenticated:
            urllib.request.urlopen(no_key, timeout=10)
        assert unauthenticated.value.code == 401

        # VLLM on local storage is checked, then FAILED saying what it needs, with the manifest to apply.
        vllm_done = wait_deployment(client, vllm.id)
        assert vllm_done.state == dpb.DEPLOYMENT_STATE_FAILED and "s3://" in vllm_done.error.message
        assert vllm_done.check.stopped_at_end_of_turn
        assert "vllm/vllm-openai" in vllm_done.manifest and "--enable-lora" in vllm_done.manifest
        assert "tiny-vllm=/models/model" in vllm_done.manifest
        # A model process that dies while serving FAILS its deployment.
        assert wait_deployment(client, doomed.id).state == dpb.DEPLOYMENT_STATE_READY
        for pid in runner_pids(platform.data_dir, doomed.id):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while client.get_deployment(doomed.id).state == dpb.DEPLOYMENT_STATE_READY \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        died = client.get_deployment(doomed.id)
        assert died.state == dpb.DEPLOYMENT_STATE_FAILED and "exited" in died.error.message, died
        assert "tiny-doomed" not in [m.id for m in ai.models.list().data]
        client.delete_deployment(doomed.id)
        listed = client.list_deployments(job="tiny").deployments
        assert [d.id for d in listed] == [vllm.id, created.id]  # newest first

        # Another organization sees none of it.
        with TuneForgeClient(platform.address, api_key=other_key) as intruder_client:
            assert list(intruder_client.list_deployments().deployments) == []
            with pytest.raises(NotFound):
                intruder_client.get_deployment(created.id)
            with pytest.raises(NotFound):
                intruder_client.delete_deployment("tiny-chat")
            with pytest.raises(NotFound):
                intruder_client.create_deployment(job.id)

        # Delete stops the model process; deleting again succeeds.
        gone = client.delete_deployment("tiny-chat")
        assert gone.deployment == created.id and not gone.already_deleted
        assert runner_pids(platform.data_dir, created.id) == []
        again = client.delete_deployment(created.id)
        assert again.already_deleted and again.deployment == created.id
        with pytest.raises(NotFound):
            client.get_deployment(created.id)
        with pytest.raises(openai.NotFoundError):
            ai.chat.completions.create(model="tiny-chat", messages=messages)

        # Deleting the job deletes its other deployments (on its JobChanged event).
        assert [d.id for d in client.list_deployments().deployments] == [vllm.id]
        client.delete_job(job.id)
        deadline = time.monotonic() + 30
        while client.list_deployments().deployments and time.monotonic() < deadline:
            time.sleep(0.3)
        assert list(client.list_deployments().deployments) == []
        assert client.delete_deployment("tiny-vllm").already_deleted

