"""`tuneforge datasets import` through the real CLI against the platform as `tuneforge up` runs it, reading
a real S3-compatible server (seaweedfs, tests/seaweed.py) and a local Hugging Face-style folder: the upload's
options (--format, --column-mapping, ...) with the same parsing, the same errors by option name, and the
same --json."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tuneforge.v1 import dataset_pb2
from typer.testing import CliRunner

from services.cli.dataset_options import build_import_request, import_option_of
from services.cli.main import app
from services.client import TuneForgeClient
from services.platform.supervisor import Platform, PlatformConfig
from tests.auth import make_key
from tests.platform.conftest import ORG
from tests.seaweed import seaweedfs

runner = CliRunner()
KEY_ID, SECRET = "IMPORTKEY", "import-secret-4b8d2f"
BUCKET = "qa-imports"  # S3 bucket names have at least 3 characters


@dataclass
class Stack:
    address: str
    key: str
    hf_root: Path  # TUNEFORGE_HF_LOCAL_ROOT
    endpoint: str = ""  # seaweedfs's S3 endpoint, for the tests that take `s3_stack`


def s3(endpoint: str) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=KEY_ID,
                        aws_secret_access_key=SECRET)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The platform, allowed to import from loopback S3 endpoints (refused unless the operator allows
    them) and from local Hugging Face folders under hf_root."""
    root = tmp_path_factory.mktemp("import-cli")
    hf_root = root / "hf"
    hf_root.mkdir()
    platform = Platform(PlatformConfig(
        data_dir=root / "data", grpc_port=0, workers=0,
        env={"TUNEFORGE_API_CALLS_PER_SECOND": "0", "TUNEFORGE_IMPORT_ENDPOINT_ALLOWLIST": "127.0.0.1",
             "TUNEFORGE_HF_LOCAL_ROOT": str(hf_root)}))
    platform.start()
    try:
        yield Stack(platform.address, make_key(platform.address, platform.data_dir, ORG, "admin"), hf_root)
    finally:
        platform.stop()


@pytest.fixture(scope="module")
def s3_stack(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """`stack` with seaweedfs beside it (anonymous reads denied)."""
    identities = [{"name": "owner", "credentials": [{"accessKey": KEY_ID, "secretKey": SECRET}],
                   "actions": ["Admin", "Read", "Write", "List"]}]
    with seaweedfs(tmp_path_factory.mktemp("import-weed"), identities,
                   lambda ep: s3(ep).create_bucket(Bucket=BUCKET)) as endpoint:
        yield Stack(stack.address, stack.key, stack.hf_root, endpoint)


def qa_csv(rows: int = 150) -> bytes:
    lines = "".join(f"What is {i} + {i}?,It is {2 * i}.\n" for i in range(rows))
    return f"question,answer\n{lines}".encode()


def put(stack: Stack, key: str, data: bytes) -> str:
    s3(stack.endpoint).put_object(Bucket=BUCKET, Key=key, Body=data)
    return f"s3://{BUCKET}/{key}"


def cli(stack: Stack, *args: str, secret: str = SECRET) -> tuple[int, str]:
    env = {"TUNEFORGE_API_KEY": stack.key, "COLUMNS": "200", "TUNEFORGE_DATA_DIR": "/nonexistent",
           "AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": secret, "AWS_SESSION_TOKEN": ""}
    result = runner.invoke(app, [*args, "--address", stack.address], env=env)
    return result.exit_code, result.output


def s3_import(stack: Stack, uri: str, name: str, *options: str, secret: str = SECRET) -> tuple[int, str]:
    return cli(stack, "datasets", "import", uri, "--name", name, "--endpoint-url", stack.endpoint,
               "--env-credentials", *options, secret=secret)


def names(stack: Stack) -> set[str]:
    with TuneForgeClient(stack.address, api_key=stack.key) as c:
        return {d.name for d in c.list_datasets(page_size=1000).datasets}


MAPPED = ("--column-mapping", "question=prompt", "--column-mapping", "answer=completion")


@pytest.mark.s3
def test_a_question_answer_csv_imports_from_s3_with_a_column_mapping_and_every_option(
        s3_stack: Stack) -> None:
    stack = s3_stack
    uri = put(stack, "qa.csv", qa_csv())
    code, out = s3_import(stack, uri, "qa-s3", *MAPPED, "--format", "prompt-completion",
                          "--max-samples", "120", "--system-prompt", "Be brief.", "--prompt-template",
                          "Q: {prompt}", "--train", "0.9", "--validation", "0.1", "--test", "0",
                          "--seed", "3", "--min-examples", "50", "--issue-limit", "10",
                          "--request-id", "qa-s3-1", "--json")
    assert code == 0, out
    shown = json.loads(out)  # --json: the dataset alone, as upload prints it
    assert shown["name"] == "qa-s3" and shown["state"] == "DATASET_STATE_READY", shown
    assert shown["format"] == "DATASET_FORMAT_PROMPT_COMPLETION"
    assert shown["source"]["s3_uri"] == uri
    with TuneForgeClient(stack.address, api_key=stack.key) as c:
        dataset = c.get_dataset("qa-s3")
    assert dataset.options.max_samples == 120 and dataset.options.system_prompt == "Be brief."
    assert dataset.options.prompt_template == "Q: {prompt}"
    assert dataset.statistics.example_count == 120 and dataset.statistics.dropped_by_max_samples == 30
    assert {s.kind: s.example_count for s in dataset.splits} == {
        dataset_pb2.DATASET_SPLIT_KIND_TRAIN: 108, dataset_pb2.DATASET_SPLIT_KIND_VALIDATION: 12}
    # The same --request-id again: the dataset of the first call, not a second one (nor a name clash).
    code, out = s3_import(stack, uri, "qa-s3", *MAPPED, "--format", "prompt-completion",
                          "--max-samples", "120", "--system-prompt", "Be brief.", "--prompt-template",
                          "Q: {prompt}", "--train", "0.9", "--validation", "0.1", "--test", "0",
                          "--seed", "3", "--min-examples", "50", "--issue-limit", "10",
                          "--request-id", "qa-s3-1", "--json")
    assert code == 0 and json.loads(out)["id"] == dataset.id, out
    # Without --json: the table (whole id), then what the report adds, as upload prints it.
    code, out = s3_import(stack, uri, "qa-s3-table", *MAPPED, "--max-samples", "100", "--min-examples", "1")
    assert code == 0, out
    assert "qa-s3-table" in out and "DATASET_STATE" not in out
    assert "left out by --max-samples: 50" in out


@pytest.mark.s3
def test_bad_options_are_refused_by_their_names_and_create_nothing(s3_stack: Stack) -> None:
    stack = s3_stack
    uri = put(stack, "qa-bad.csv", qa_csv())
    refusals = [  # (options, what the output says); the first three never reach the platform
        (["--column-mapping", "prompt=question"], "write COLUMN=FIELD, i.e. question=prompt"),
        (["--format", "csv"], "Invalid value for --format: 'csv' is not a dataset format"),
        (["--max-samples", "0"], "Invalid value for --max-samples: must be at least 1"),
        # The platform's refusals, its field paths (prompt_template, split, source.max_rows) as options:
        (["--prompt-template", "{prompt} {answer}"], "--prompt-template: uses unknown placeholders {answer}"),
        (["--train", "0.5"], "--train/--validation/--test: the fractions must sum to 1"),
        (["--max-rows", "-1"], "--max-rows: must not be negative"),
    ]
    for options, says in refusals:
        code, out = s3_import(stack, uri, "qa-bad", *MAPPED, *options)
        assert code == 2 and says in out, (options, out)
        assert "options.prompt_template" not in out and "split." not in out and "source." not in out, out
    # The source's own problems: a wrong secret is the option that sent it, at the call (nothing runs).
    code, out = s3_import(stack, uri, "qa-bad", *MAPPED, secret="wrong")
    assert code == 2 and "--env-credentials (AWS_SECRET_ACCESS_KEY): rejected by" in out, out
    # --env-credentials with none of them set: said at once, not sent empty.
    result = runner.invoke(app, ["datasets", "import", uri, "--name", "qa-bad", "--endpoint-url",
                                 stack.endpoint, "--env-credentials", *MAPPED, "--address", stack.address],
                           env={"TUNEFORGE_API_KEY": stack.key, "COLUMNS": "200", "AWS_ACCESS_KEY_ID": "",
                                "AWS_SECRET_ACCESS_KEY": "", "AWS_SESSION_TOKEN": ""})
    assert result.exit_code == 2, result.output
    assert "none of AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN is set" in " ".join(
        result.output.split()), result.output
    code, out = cli(stack, "datasets", "import", uri, "--name", "qa-bad", "--endpoint-url",
                    "http://10.9.8.7:9000", *MAPPED)
    assert code == 2 and "--endpoint-url: " in out, out
    code, out = cli(stack, "datasets", "import", "owner/name", "--name", "qa-bad", "--region", "eu-west-1")
    assert code == 2 and "--region: applies to s3_uri and gcs_uri only" in out, out
    assert "qa-bad" not in names(stack)


@pytest.mark.s3
def test_an_unmapped_csv_fails_with_the_cause_once(s3_stack: Stack) -> None:
    stack = s3_stack
    uri = put(stack, "qa-unmapped.csv", qa_csv())
    code, out = s3_import(stack, uri, "qa-unmapped")
    assert code == 1, out
    assert "failed Dataset 'qa-unmapped' is invalid: 150 errors" in out, out
    assert out.count('has no "messages" field') == 1, out  # once, with the count, not once per line
    assert "MISSING_MESSAGES" in out and "e.g. lines 2, 3, 4, …" in out
    assert len(out.splitlines()) < 16, out


def test_a_local_hugging_face_folder_imports_with_format_and_options(stack: Stack) -> None:
    folder = stack.hf_root / "qa-hub"
    folder.mkdir()
    rows = [{"prompt": f"What is {i} + {i}?", "completion": f"It is {2 * i}."} for i in range(60)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out = cli(stack, "datasets", "import", str(folder), "--name", "qa-hf", "--format",
                    "prompt_completion", "--max-rows", "50", "--max-samples", "40", "--min-examples", "10",
                    "--system-prompt", "Answer with a number.", "--json")
    assert code == 0, out
    shown = json.loads(out)
    assert shown["state"] == "DATASET_STATE_READY" and shown["format"] == "DATASET_FORMAT_PROMPT_COMPLETION"
    assert shown["statistics"]["example_count"] == "40"  # int64: a string in proto JSON
    # A format the rows are not: the import ends FAILED and says so (exit 1).
    code, out = cli(stack, "datasets", "import", str(folder), "--name", "qa-hf-chat", "--format",
                    "openai_chat", "--min-examples", "10")
    assert code == 1 and "failed Dataset 'qa-hf-chat' is invalid" in out, out


def test_import_request_carries_every_option_as_upload_metadata_does() -> None:
    source = dataset_pb2.DatasetSource(s3_uri="s3://b/qa.csv")
    request = build_import_request(
        source, name="qa", format="prompt_completion", column_mapping=["question=prompt,answer=completion"],
        train=0.9, validation=0.1, test=0, seed=3, min_examples=5, tokenizer="tok", max_length=512,
        max_samples=7, system_prompt="S", prompt_template="Q: {prompt}", issue_limit=9, request_id="r")
    assert request.format == dataset_pb2.DATASET_FORMAT_PROMPT_COMPLETION
    assert dict(request.column_mapping.columns) == {"prompt": "question", "completion": "answer"}
    split = request.split
    assert (split.train_fraction, split.validation_fraction, split.seed) == (0.9, 0.1, 3)
    assert request.split.HasField("test_fraction") and request.min_examples == 5
    assert (request.options.max_samples, request.options.system_prompt, request.issue_limit) == (7, "S", 9)
    assert not build_import_request(source).HasField("min_examples")
    assert import_option_of("options.max_samples") == "--max-samples"
    assert import_option_of("column_mapping.columns[prompt]") == "--column-mapping"
    assert import_option_of("split") == "--train/--validation/--test"
    assert import_option_of("source.endpoint_url") == "--endpoint-url"
    assert import_option_of("source.s3_uri") == "SOURCE"
    assert import_option_of("something.else") == "something.else"


def test_a_question_answer_csv_in_a_local_hugging_face_folder_imports_with_a_column_mapping(
        stack: Stack) -> None:
    folder = stack.hf_root / "qa-csv"
    folder.mkdir()
    (folder / "train.csv").write_bytes(qa_csv(60))
    code, out = cli(stack, "datasets", "import", str(folder), "--name", "qa-hf-csv", *MAPPED, "--format",
                    "prompt_completion", "--min-examples", "10", "--json")
    assert code == 0, out
    assert json.loads(out)["statistics"]["example_count"] == "60"
