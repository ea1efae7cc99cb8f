"""Token statistics with the tiny model's tokenizer and chat template, alone and through the service."""

from __future__ import annotations

import json
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import grpc
import huggingface_hub.constants
import pytest
from tuneforge.v1 import dataset_pb2
from tuneforge.v1 import dataset_service_pb2 as pb
from tuneforge.v1.dataset_service_pb2_grpc import DatasetServiceStub

from services.datasets.domain import DatasetFormat
from services.datasets.settings import DatasetSettings
from services.datasets.tokens import load_tokenizer, token_lengths, token_stats
from tests.datasets.helpers import (
    ErrorDetails,
    chat_lines,
    jsonl,
    local_path,
    meta,
    object_files,
    upload_requests,
    validate_requests,
    write_jsonl,
)
from trainer_worker.tiny import build_tiny_chat_model, synthetic_rows
from tuneforge_core.errors import InvalidArgument


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny") / "model")


def _template_lengths(tokenizer: Any, path: Path) -> list[int]:
    return [
        len(tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=True, return_dict=False))
        for line in path.read_text().splitlines()
    ]


def test_chat_lengths_match_the_chat_template(tiny_model: Path, tmp_path: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_model))
    path = write_jsonl(tmp_path / "n.jsonl", chat_lines(30))
    lengths = token_lengths(path, DatasetFormat.OPENAI_CHAT, tokenizer)
    assert lengths == _template_lengths(tokenizer, path)
    assert len(set(lengths)) > 1  # the system prompt of every other example shows


def test_preference_counts_the_longer_answer(tiny_model: Path, tmp_path: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_model))
    row = {
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "ok"}],
        "rejected": [{"role": "assistant", "content": "a much longer and wordier rejected answer"}],
    }
    path = write_jsonl(tmp_path / "p.jsonl", [json.dumps(row)])
    rejected = tokenizer.apply_chat_template(
        [*row["prompt"], *row["rejected"]], tokenize=True, return_dict=False
    )
    assert token_lengths(path, DatasetFormat.PREFERENCE, tokenizer) == [len(rejected)]


def test_token_stats_arithmetic() -> None:
    stats = token_stats(list(range(1, 101)), "tok", 90, (i % 2 == 0 for i in range(100)))
    assert (stats.min, stats.median, stats.p95, stats.max, stats.total) == (1, 50, 95, 100, 5050)
    assert stats.truncated_count == 10
    # Train = odd lengths 1..99, each cut at 90.
    assert stats.train_tokens == sum(min(n, 90) for n in range(1, 101, 2))


def test_a_tokenizer_that_cannot_be_loaded_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument) as caught:
        load_tokenizer(str(tmp_path / "no-such-model"))
    assert [v.field for v in caught.value.violations] == ["metadata.tokenizer"]


async def test_upload_with_a_tokenizer_fills_token_statistics(
    stub: DatasetServiceStub, tiny_model: Path, datasets_settings: DatasetSettings
) -> None:
    tokenizer = load_tokenizer(str(tiny_model))
    data = jsonl([json.dumps(r) for r in synthetic_rows(120, family="chat")])
    response = await stub.UploadDataset(
        upload_requests(  # type: ignore[arg-type]
            meta(tokenizer=str(tiny_model), max_length=40), data
        )
    )
    tokens = response.dataset.statistics.tokens
    assert tokens.tokenizer == str(tiny_model) and tokens.max_length == 40
    train = next(s for s in response.dataset.splits if s.kind == dataset_pb2.DATASET_SPLIT_KIND_TRAIN)
    train_lengths = _template_lengths(tokenizer, local_path(train.uri))
    assert tokens.train_tokens == sum(min(n, 40) for n in train_lengths)
    assert tokens.total >= sum(train_lengths) and tokens.min <= tokens.median <= tokens.p95 <= tokens.max
    assert tokens.truncated_count == sum(1 for n in _all_lengths(tokenizer, response.dataset) if n > 40)
    stored = await stub.GetDataset(pb.GetDatasetRequest(organization="acme", dataset="support-chats"))
    assert stored.dataset.statistics.tokens == tokens
    # A re-split recounts the train split's tokens.
    resplit = await stub.SplitDataset(
        pb.SplitDatasetRequest(
            organization="acme",
            dataset="support-chats",
            split=dataset_pb2.SplitConfig(train_fraction=0.5, validation_fraction=0.5, test_fraction=0.0),
        )
    )
    new_train = next(s for s in resplit.dataset.splits if s.kind == dataset_pb2.DATASET_SPLIT_KIND_TRAIN)
    assert resplit.dataset.statistics.tokens.train_tokens == sum(
        min(n, 40) for n in _template_lengths(tokenizer, local_path(new_train.uri))
    )
    report = await stub.GetValidationReport(
        pb.GetValidationReportRequest(organization="acme", dataset="support-chats")
    )
    assert report.report.statistics.tokens.train_tokens == resplit.dataset.statistics.tokens.train_tokens


def _all_lengths(tokenizer: Any, dataset: dataset_pb2.Dataset) -> list[int]:
    return [n for s in dataset.splits for n in _template_lengths(tokenizer, local_path(s.uri))]


async def test_an_unloadable_tokenizer_fails_the_upload_and_leaves_nothing(
    stub: DatasetServiceStub, tmp_path: Path, datasets_settings: DatasetSettings, objects_root: Path
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.UploadDataset(
            upload_requests(  # type: ignore[arg-type]
                meta(tokenizer=str(tmp_path / "missing")), jsonl(chat_lines(100))
            )
        )
    err = ErrorDetails(caught.value)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.fields == ["metadata.tokenizer"]
    assert object_files(objects_root / "datasets") == []
    assert object_files(datasets_settings.data_dir / "tmp") == []


async def test_validate_dataset_reports_token_statistics_without_storing(
    stub: DatasetServiceStub, tiny_model: Path, objects_root: Path
) -> None:
    data = jsonl(chat_lines(100))
    response = await stub.ValidateDataset(
        validate_requests(meta(tokenizer=str(tiny_model), max_length=16), data)  # type: ignore[arg-type]
    )
    tokens = response.report.statistics.tokens
    assert tokens.max_length == 16 and tokens.truncated_count == 100 and tokens.total > 0
    assert tokens.train_tokens == 0  # no split without an upload
    assert object_files(objects_root) == []


@pytest.mark.parametrize("where", ["/proc/kmsg", "/etc", "relative/../../etc", "file:///etc"])
async def test_a_tokenizer_outside_the_model_roots_is_refused_before_any_byte_is_read(
    stub: DatasetServiceStub, where: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.UploadDataset(upload_requests(meta(tokenizer=where), jsonl(chat_lines(100))))  # type: ignore[arg-type]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tokenizer" in (caught.value.details() or "")


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    """A server with the hub in reach, as far as huggingface_hub knows (not HF_HUB_OFFLINE), an empty Hugging
    Face cache, and no name resolved but loopback: the hosts asked for are listed instead."""
    asked: list[str] = []
    resolve = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host in ("localhost", "127.0.0.1", "::1"):
            return resolve(host, *args, **kwargs)
        asked.append(str(host))
        raise socket.gaierror(socket.EAI_NONAME, "no network in this test")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    try:  # huggingface_hub keeps the registry it fetched for its user agent; forget it, so it would ask
        from huggingface_hub.utils import _detect_agent

        monkeypatch.setattr(_detect_agent, "_registry", None, raising=False)
    except ImportError:
        pass
    return asked


async def test_a_hub_id_not_in_the_cache_is_refused_at_once_without_the_network(
    stub: DatasetServiceStub, no_network: list[str]
) -> None:
    """A hub id is loaded from this machine's Hugging Face cache only: one that is not there is refused in
    well under a second, naming the field and the cache (it used to ask huggingface.co, 50 s offline)."""
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.UploadDataset(
            upload_requests(meta(tokenizer="meta-llama/Llama-3.2-1B-Instruct"), jsonl(chat_lines(100)))  # type: ignore[arg-type]
        )
    elapsed = time.monotonic() - started
    err = ErrorDetails(caught.value)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.fields == ["metadata.tokenizer"]
    assert "not in this machine's Hugging Face cache" in err.message, err.message
    assert f"HF_HOME={huggingface_hub.constants.HF_HOME}" in err.message, err.message
    assert no_network == [] and elapsed < 5, (no_network, elapsed)


def test_a_hub_id_in_the_cache_loads_from_it_without_the_network(
    tiny_model: Path, no_network: list[str]
) -> None:
    repo = Path(huggingface_hub.constants.HF_HUB_CACHE) / "models--acme--tiny-chat"
    shutil.copytree(tiny_model, repo / "snapshots" / "c0ffee")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c0ffee")
    tokenizer = load_tokenizer("acme/tiny-chat")
    assert tokenizer.chat_template == load_tokenizer(str(tiny_model)).chat_template
    assert no_network == []
