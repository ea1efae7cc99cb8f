"""Serving's pure logic: request checks of the chat endpoint, stop sequences, the VLLM manifest, and the
model process's self-check on a model that never learned to stop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from services.serving.http import ApiError, parse_chat
from services.serving.manifest import VllmSource, max_lora_rank, render, resource_name
from services.serving.runner import Model, StopFilter, check_problem, end_of_turn_token
from services.serving.settings import ServingSettings

SETTINGS = ServingSettings(serving_max_tokens=100, serving_default_max_tokens=16)
HI = [{"role": "user", "content": "hi"}]


def test_a_chat_request_is_read_with_openai_defaults() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    chat = parse_chat({"model": "m", "messages": [{"role": "developer", "content": "be brief"},
                                                  {"role": "user", "content": parts}],
                       "stop": "###", "n": 1, "stream": True, "stream_options": {"include_usage": True}},
                      SETTINGS)
    assert chat.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"}]
    assert (chat.max_tokens, chat.temperature, chat.top_p, chat.stop) == (16, 1.0, 1.0, ["###"])
    assert chat.stream and chat.include_usage
    assert parse_chat({"model": "m", "messages": HI, "max_completion_tokens": 5}, SETTINGS).max_tokens == 5


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": HI}, "model"),
    ({"model": "m"}, "messages"),
    ({"model": "m", "messages": []}, "messages"),
    ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"model": "m", "messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content[0]"),
    ({"model": "m", "messages": HI, "n": 2}, "n"),
    ({"model": "m", "messages": HI, "max_tokens": 0}, "max_tokens"),
    ({"model": "m", "messages": HI, "max_tokens": 101}, "max_tokens"),
    ({"model": "m", "messages": HI, "max_tokens": True}, "max_tokens"),
    ({"model": "m", "messages": HI, "temperature": 2.5}, "temperature"),
    ({"model": "m", "messages": HI, "temperature": "hot"}, "temperature"),
    ({"model": "m", "messages": HI, "top_p": 0}, "top_p"),
    ({"model": "m", "messages": HI, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": "m", "messages": HI, "stop": [1]}, "stop"),
    ({"model": "m", "messages": HI, "stream": "yes"}, "stream"),
])
def test_a_bad_field_is_a_400_naming_it(body: dict[str, Any], param: str) -> None:
    with pytest.raises(ApiError) as refused:
        parse_chat(body, SETTINGS)
    assert refused.value.status == 400 and refused.value.param == param


def test_a_body_that_is_not_an_object_is_a_400() -> None:
    with pytest.raises(ApiError) as refused:
        parse_chat(["model"], SETTINGS)
    assert refused.value.status == 400


def test_stop_sequences_cut_the_text_even_across_pieces() -> None:
    stops = StopFilter(["END"])
    out = "".join(stops.feed(piece) for piece in ["Hello E", "N", "D and more"]) + stops.flush()
    assert out == "Hello " and stops.stopped
    free = StopFilter([])
    assert "".join(free.feed(p) for p in ["a", "b"]) + free.flush() == "ab" and not free.stopped
    held = StopFilter(["xyz"])
    assert held.feed("abx") == "a" and held.flush() == "bx"


def test_the_vllm_manifest_is_a_deployment_and_a_service_serving_the_adapter() -> None:
    source = VllmSource(deployment_id="dep_1", job_id="job_1", name="Support.Bot_v2", base_model="org/base",
                        uri="s3://bucket/jobs/acme/job_1/adapter", merged=False, lora_rank=24,
                        image="vllm/vllm-openai:v0.11.0", s3_region="eu-west-1", s3_endpoint_url="")
    deployment, service = yaml.safe_load_all(render(source))
    assert (deployment["kind"], service["kind"]) == ("Deployment", "Service")
    assert deployment["metadata"]["name"] == service["metadata"]["name"] == resource_name(source.name) \
        == "tf-support-bot-v2"
    pod = deployment["spec"]["template"]["spec"]
    fetch = pod["initContainers"][0]
    assert fetch["command"][:4] == ["aws", "s3", "cp", "--recursive"] and source.uri in fetch["command"]
    vllm = pod["containers"][0]
    assert vllm["image"] == source.image
    args = vllm["args"]
    assert args[args.index("--model") + 1] == "org/base" and "--enable-lora" in args
    assert args[args.index("--lora-modules") + 1] == "Support.Bot_v2=/models/model"
    assert args[args.index("--max-lora-rank") + 1] == "32" == str(max_lora_rank(24))
    merged, _ = yaml.safe_load_all(render(VllmSource(**{**source.__dict__, "merged": True})))
    merged_args = merged["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--enable-lora" not in merged_args and merged_args[:2] == ["--model", "/models/model"]


def test_the_runner_finds_the_same_end_of_turn_token_as_training(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from trainer_worker.recipes.base import end_of_turn_token as training_rule
    from trainer_worker.tiny import build_tiny_chat_model

    tokenizer = AutoTokenizer.from_pretrained(build_tiny_chat_model(tmp_path / "tiny"))
    assert end_of_turn_token(tokenizer) == training_rule(tokenizer) == "<|im_end|>"


def test_a_model_that_never_learned_to_stop_fails_its_self_check(tmp_path: Path) -> None:
    from trainer_worker.tiny import build_tiny_chat_model

    build_tiny_chat_model(tmp_path / "objects" / "models" / "tiny")  # untrained: it rambles
    model = Model({"work_dir": str(tmp_path / "work"), "storage": {"url": (tmp_path / "objects").as_uri()},
                   "model_key": "models/tiny", "base_model": {"kind": "hub", "ref": "unused", "path": ""},
                   "check": {"prompt": "Hello!", "max_new_tokens": 8}})
    model.load()
    check = model.self_check()
    assert check["loaded"] and check["generated"] and check["end_of_turn_token"] == "<|im_end|>"
    assert not check["stopped_at_end_of_turn"] and check["tokens"] == 8
    assert "did not stop at the end-of-turn token <|im_end|> within 8 tokens" in check_problem(check)
