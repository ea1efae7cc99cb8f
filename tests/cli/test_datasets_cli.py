"""`tuneforge datasets upload`, `datasets validate` and `jobs create --validate-only` through the real CLI
against the platform as `tuneforge up` runs it (its own, so what it uploads does not change what the
shared seeded platform's paging tests count)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from io import StringIO
from pathlib import Path

import pytest
from google.protobuf import json_format
from rich.console import Console
from tuneforge.v1 import dataset_pb2, dataset_service_pb2
from typer.testing import CliRunner

from services.cli.dataset_options import build_metadata
from services.cli.datasets_cli import upload
from services.cli.main import app
from services.client import TuneForgeClient
from tests.auth import make_key
from tests.platform.conftest import ORG, Seeded, chat_file, seed_platform

runner = CliRunner()


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seeded]:
    yield from seed_platform(tmp_path_factory.mktemp("cli-platform"))


@pytest.fixture(scope="module")
def key(platform: Seeded) -> str:
    return make_key(platform.address, platform.platform.data_dir, ORG, "admin")


def cli(platform: Seeded | None, key: str, *args: str, columns: int = 200) -> tuple[int, str]:
    address = ["--address", platform.address] if platform is not None else []
    result = runner.invoke(app, [*args, *address], env={"TUNEFORGE_API_KEY": key, "COLUMNS": str(columns),
                                                        "TUNEFORGE_DATA_DIR": "/nonexistent"})
    return result.exit_code, result.output


def client(platform: Seeded, key: str) -> TuneForgeClient:
    return TuneForgeClient(platform.address, api_key=key)


def qa_csv(path: Path, rows: int = 150) -> Path:
    rows_text = "".join(f"What is {i} + {i}?,It is {2 * i}.\n" for i in range(rows))
    path.write_text("question,answer\n" + rows_text)
    return path


def dataset_names(platform: Seeded, key: str) -> set[str]:
    with client(platform, key) as c:
        return {d.name for d in c.list_datasets(page_size=1000).datasets}


def test_a_question_answer_csv_uploads_with_a_column_mapping_and_every_option(
        platform: Seeded, key: str, tmp_path: Path) -> None:
    path = qa_csv(tmp_path / "qa.csv")
    code, out = cli(platform, key, "datasets", "upload", str(path), "--name", "qa-mapped",
                    "--column-mapping", "question=prompt", "--column-mapping", "answer=completion",
                    "--format", "prompt_completion", "--max-samples", "120", "--system-prompt", "Be brief.",
                    "--prompt-template", "Q: {prompt}", "--train", "0.9", "--validation", "0.1",
                    "--test", "0", "--seed", "3", "--min-examples", "50", "--issue-limit", "10", "--json")
    assert code == 0, out
    shown = json.loads(out)  # --json: the dataset alone, no progress bar around it
    assert shown["name"] == "qa-mapped" and shown["state"] == "DATASET_STATE_READY"
    assert shown["format"] == "DATASET_FORMAT_PROMPT_COMPLETION"
    with client(platform, key) as c:
        dataset = c.get_dataset("qa-mapped")
    assert dataset.options.max_samples == 120 and dataset.options.system_prompt == "Be brief."
    assert dataset.options.prompt_template == "Q: {prompt}"
    assert dataset.statistics.example_count == 120 and dataset.statistics.dropped_by_max_samples == 30
    counts = {s.kind: s.example_count for s in dataset.splits}
    assert counts == {dataset_pb2.DATASET_SPLIT_KIND_TRAIN: 108,
                      dataset_pb2.DATASET_SPLIT_KIND_VALIDATION: 12}
    # --validation-dataset: that dataset's examples are the validation split.
    code, out = cli(platform, key, "datasets", "upload", str(path), "--name", "qa-external",
                    "--column-mapping", "question=prompt,answer=completion",
                    "--validation-dataset", "qa-mapped")
    assert code == 0, out
    with client(platform, key) as c:
        external = c.get_dataset("qa-external")
    assert external.validation_dataset_id == dataset.id
    assert "qa-external" in out and external.id in out


def test_an_unmapped_csv_is_refused_with_the_cause_once_and_the_mapping_to_use(
        platform: Seeded, key: str, tmp_path: Path) -> None:
    path = qa_csv(tmp_path / "qa.csv")
    code, out = cli(platform, key, "datasets", "upload", str(path), "--name", "qa-unmapped")
    assert code == 1, out  # the file is invalid (as `datasets validate` exits for it), not an option
    assert "error Dataset 'qa-unmapped' is invalid: 150 errors" in out
    assert out.count('has no "messages" field') == 1, out  # once, with the count, not once per line
    assert "MISSING_MESSAGES" in out and "e.g. lines 2, 3, 4, …" in out
    assert "--column-mapping question=prompt,answer=completion" in out
    assert f"(tuneforge datasets validate {path} prints the whole report)" in " ".join(out.split()), out
    assert len(out.splitlines()) < 12, out
    assert "qa-unmapped" not in dataset_names(platform, key)


def test_a_utf16_file_is_named_as_utf16_and_not_sent(platform: Seeded, key: str, tmp_path: Path) -> None:
    path = tmp_path / "chat16.jsonl"
    path.write_text(chat_file(tmp_path / "chat.jsonl").read_text(), encoding="utf-16")
    code, out = cli(platform, key, "datasets", "upload", str(path), "--name", "utf16")
    assert code == 1, out
    assert "chat16.jsonl is UTF-16 (little-endian, with a byte-order mark), not UTF-8" in out
    assert "0 examples" not in out and "utf16" not in dataset_names(platform, key)
    # The server says the same of it, once (ValidateDataset), rather than "0 examples".
    with client(platform, key) as c:
        report = validate_on_server(c, path, build_metadata(path))
    assert [(i.code, i.line) for i in report.issues] == [("INVALID_UTF8", 0)]
    assert report.issues[0].message.startswith("The file is UTF-16 (little-endian, with a byte-order mark)")


def test_options_the_server_refuses_are_named_as_options(platform: Seeded, key: str, tmp_path: Path) -> None:
    path = chat_file(tmp_path / "chat.jsonl")
    code, out = cli(platform, key, "datasets", "upload", str(path), "--name", "bad-template",
                    "--prompt-template", "{prompt} {answer}")
    assert code == 2 and "--prompt-template: uses unknown placeholders {answer}" in out, out
    code, out = cli(platform, key, "datasets", "upload", str(path), "--name", "bad-split", "--train", "0.5")
    assert code == 2 and "--train/--validation/--test: the fractions must sum to 1" in out, out
    code, out = cli(platform, key, "datasets", "upload", str(path), "--name", "bad-external",
                    "--validation-dataset", "no-such-dataset")
    assert code == 2 and "--validation-dataset: was not found" in out, out
    code, out = cli(platform, key, "datasets", "upload", str(path), "--name", "bad-mapping",
                    "--column-mapping", "prompt=question")
    assert code == 2 and "write COLUMN=FIELD, i.e. question=prompt" in out, out
    assert not dataset_names(platform, key) & {"bad-template", "bad-split", "bad-external", "bad-mapping"}


def test_the_progress_bar_shows_checksum_bytes_sent_and_the_servers_phase(
        platform: Seeded, key: str, tmp_path: Path) -> None:
    path = chat_file(tmp_path / "chat.jsonl", rows=30000)  # a few MB: several chunks
    metadata = build_metadata(path, name="with-progress", request_id="progress-1")
    metadata.organization = ORG
    out = StringIO()
    terminal = Console(file=out, force_terminal=True, width=150, color_system=None)
    with client(platform, key) as c:
        response = upload(c.datasets, path, metadata, terminal, show=True, timeout_s=120)
    assert response.dataset.state == dataset_pb2.DATASET_STATE_READY
    text = out.getvalue()
    size_mib = f"{path.stat().st_size / 2**20:.1f}/{path.stat().st_size / 2**20:.1f} MiB"
    assert "checksum chat.jsonl" in text and "upload chat.jsonl" in text and size_mib in text, text
    assert "server: validating, splitting" in text
    # Not a terminal (CliRunner, a pipe): no bar at all.
    code, out_text = cli(platform, key, "datasets", "upload", str(path), "--name", "no-progress")
    assert code == 0 and "no-progress" in out_text, out_text
    assert "checksum" not in out_text and "upload chat.jsonl" not in out_text and " MB" not in out_text


def validate_on_server(c: TuneForgeClient, path: Path, metadata: dataset_service_pb2.UploadDatasetMetadata
                       ) -> dataset_pb2.ValidationReport:
    metadata.organization = ORG
    requests = [dataset_service_pb2.ValidateDatasetRequest(metadata=metadata),
                dataset_service_pb2.ValidateDatasetRequest(chunk=path.read_bytes())]
    return c.datasets.ValidateDataset(iter(requests), timeout=60).report


@pytest.mark.parametrize("case", ["valid", "unmapped", "mapped", "few"])
def test_validate_checks_a_local_file_as_the_server_does(platform: Seeded, key: str, tmp_path: Path,
                                                         case: str) -> None:
    path = chat_file(tmp_path / "chat.jsonl") if case in ("valid", "few") else qa_csv(tmp_path / "qa.csv")
    options = {"mapped": ["--column-mapping", "question=prompt,answer=completion", "--max-samples", "100",
                          "--system-prompt", "Be brief."],
               "few": ["--min-examples", "500", "--issue-limit", "3"]}.get(case, [])
    code, out = cli(None, key, "datasets", "validate", str(path), *options, "--json")
    valid = case in ("valid", "mapped")
    assert code == (0 if valid else 1), out
    local = json.loads(out)
    metadata = build_metadata(path, **{  # type: ignore[arg-type]
        "mapped": {"column_mapping": ["question=prompt,answer=completion"], "max_samples": 100,
                   "system_prompt": "Be brief."},
        "few": {"min_examples": 500, "issue_limit": 3}}.get(case, {}))
    with client(platform, key) as c:
        remote = validate_on_server(c, path, metadata)
    assert local == json.loads(json_format.MessageToJson(remote, preserving_proto_field_name=True))
    code, out = cli(None, key, "datasets", "validate", str(path), *options)
    assert code == (0 if valid else 1), out
    first = out.splitlines()[0]
    assert first.startswith("valid: " if valid else "invalid: "), out
    if case == "unmapped":
        assert "every example has an error (150 of 150); the 100 listed are all MISSING_MESSAGES" in out
        assert out.count('has no "messages" field') == 1, out
    if case == "few":
        assert ("TOO_FEW_EXAMPLES: The file has 120 examples; at least 500 are required (--min-examples)"
                in out)


def test_validate_refuses_a_bad_option_by_name(tmp_path: Path) -> None:
    path = chat_file(tmp_path / "chat.jsonl")
    code, out = cli(None, "", "datasets", "validate", str(path), "--prompt-template", "{prompt} {x}")
    assert code == 2 and "--prompt-template: uses unknown placeholders {x}" in out, out
    code, out = cli(None, "", "datasets", "validate", str(path), "--format", "csv")
    assert code == 2 and "Invalid value for --format: 'csv' is not a dataset format" in out, out


def test_validate_only_says_nothing_was_created_and_shows_the_resolved_spec(platform: Seeded,
                                                                           key: str) -> None:
    def job_count() -> int:
        with client(platform, key) as c:
            return len(c.list_jobs(page_size=1000).jobs)

    before = job_count()
    args = ("jobs", "create", "--model", "Qwen/Qwen2.5-0.5B", "--dataset", platform.dataset_ids[0],
            "--epochs", "2", "--validate-only")
    code, out = cli(platform, key, *args)
    assert code == 0, out
    assert out.startswith("valid: nothing was created. The spec the platform would run (defaults filled in):")
    assert "QUEUED" not in out and "job_" not in out
    spec = json.loads(out[out.index("{"):])
    assert spec["dataset"] == platform.dataset_ids[0] and spec["hyperparameters"]["epochs"] == 2
    assert spec["method"] == "TRAINING_METHOD_SFT" and spec["lora"]["rank"] > 0  # defaults filled in
    code, out = cli(platform, key, *args, "--json")
    assert code == 0, out
    shown = json.loads(out)
    assert shown["valid"] is True and shown["created"] is False and "id" not in shown
    assert shown["spec"]["hyperparameters"]["epochs"] == 2
    assert job_count() == before
    # An invalid spec is still an error naming the field.
    code, out = cli(platform, key, "jobs", "create", "--model", "Qwen/Qwen2.5-0.5B", "--dataset",
                    platform.dataset_ids[0], "--epochs", "-1", "--validate-only")
    assert code == 2 and "spec.hyperparameters.epochs" in out and "nothing was created" not in out, out


def test_listed_ids_are_whole_on_a_narrow_terminal(platform: Seeded, key: str) -> None:
    for args, ids in ((("datasets", "list"), platform.dataset_ids), (("jobs", "list"), platform.job_ids)):
        code, out = cli(platform, key, *args, columns=50)
        assert code == 0, out
        assert "…" not in out, out
        for ref in ids:
            assert ref in out, out


def test_shell_completion_completes_commands_options_and_formats() -> None:
    import os
    import shlex
    import subprocess
    import sys

    tuneforge = str(Path(sys.executable).parent / "tuneforge")  # the entry point, as a shell runs it

    def complete(words: str) -> list[str]:
        env = {**os.environ, "_TUNEFORGE_COMPLETE": "complete_bash", "COMP_WORDS": words,
               "COMP_CWORD": str(len(words.split()) - 1)}
        done = subprocess.run([tuneforge], env=env, capture_output=True, text=True, timeout=60, check=False)
        return done.stdout.split()

    assert complete("tuneforge datasets va") == ["validate"]
    assert "--column-mapping" in complete("tuneforge datasets upload x.csv --col")
    assert complete("tuneforge datasets upload x.csv --format prompt_") == [
        "prompt_completion", "prompt_only"]
    # --show-completion takes no value: it finds the shell it runs under among its parent processes, so it
    # runs here as a user's bash runs it (`; true` keeps bash from exec-ing it in its own place; run straight
    # from pytest under make, no shell is found and it fails with "Shell  not supported").
    shown = subprocess.run(["bash", "-c", f"{shlex.quote(tuneforge)} --show-completion; true"],
                           capture_output=True, text=True, timeout=60, check=False)
    assert shown.returncode == 0 and "_TUNEFORGE_COMPLETE=complete_bash" in shown.stdout, shown
