"""The CLI's pure parts: upload options to UploadDatasetMetadata (each bad one refused naming its option),
the encoding check, the cause-first summary of a report, and tables that never cut an id."""

from __future__ import annotations

import json
import shlex
from io import StringIO
from pathlib import Path

import pytest
import typer
from rich.console import Console
from rich.table import Table
from tuneforge.v1 import dataset_pb2

from services.cli.dataset_options import (
    build_metadata,
    encoding_problem,
    option_of,
    parse_column_mapping,
    parse_format,
)
from services.cli.dataset_report import (
    Problem,
    as_options,
    from_violations,
    import_as_options,
    report_lines,
    summary_lines,
)
from services.cli.render import dataset_table, whole_ids
from services.datasets.uploads import bounded_violations


def refused(option: str, fn: object, *args: object, **kwargs: object) -> str:
    with pytest.raises(typer.BadParameter) as info:
        fn(*args, **kwargs)  # type: ignore[operator]
    assert info.value.param_hint == option, info.value.param_hint
    return str(info.value)


# -- column mapping and format ---------------------------------------------------------------------

def test_column_mapping_is_column_equals_field_comma_separated_or_repeated() -> None:
    assert parse_column_mapping(["question=prompt,answer=completion"]) == {"prompt": "question",
                                                                           "completion": "answer"}
    assert parse_column_mapping(["question=prompt", " answer = completion ", "ok=label,"]) == {
        "prompt": "question", "completion": "answer", "label": "ok"}
    # A column renamed to a name no format has (an extra column a reward function reads) is allowed.
    assert parse_column_mapping(["sol=solution"]) == {"solution": "sol"}
    assert parse_column_mapping(None) == {}


@pytest.mark.parametrize(("value", "says"), [
    ("question", "is not COLUMN=FIELD"),
    ("=prompt", "is not COLUMN=FIELD"),
    ("question=", "is not COLUMN=FIELD"),
    ("prompt=question", "write COLUMN=FIELD, i.e. question=prompt"),
    ("q=prompt,r=prompt", "field 'prompt' is mapped twice"),
    ("q=prompt,q=completion", "column 'q' is mapped twice"),
])
def test_a_bad_column_mapping_names_the_option_and_the_pair(value: str, says: str) -> None:
    assert says in refused("--column-mapping", parse_column_mapping, [value])


def test_format_by_short_name_in_any_case() -> None:
    assert parse_format("prompt_completion") == dataset_pb2.DATASET_FORMAT_PROMPT_COMPLETION
    assert parse_format("Prompt-Completion") == dataset_pb2.DATASET_FORMAT_PROMPT_COMPLETION
    assert parse_format("KTO") == dataset_pb2.DATASET_FORMAT_KTO
    assert parse_format(None) == parse_format("auto") == dataset_pb2.DATASET_FORMAT_UNSPECIFIED
    message = refused("--format", parse_format, "jsonl")
    assert "'jsonl' is not a dataset format" in message and "openai_chat" in message and "kto" in message


# -- metadata ---------------------------------------------------------------------------------------

@pytest.fixture
def qa_csv(tmp_path: Path) -> Path:
    path = tmp_path / "qa.csv"
    path.write_text("question,answer\n" + "".join(f"What is {i}?,It is {i}.\n" for i in range(120)))
    return path


def test_every_option_lands_in_the_metadata(qa_csv: Path) -> None:
    meta = build_metadata(
        qa_csv, name="qa", description="d", format="prompt_completion",
        column_mapping=["question=prompt,answer=completion"], train=0.7, validation=0.2, test=0.1, seed=7,
        min_examples=10, tokenizer="tok", max_length=512, max_samples=100, system_prompt="Be brief.",
        prompt_template="Q: {prompt}", issue_limit=5, request_id="r1")
    assert (meta.name, meta.description, meta.filename, meta.size_bytes) == (
        "qa", "d", "qa.csv", qa_csv.stat().st_size)
    assert meta.format == dataset_pb2.DATASET_FORMAT_PROMPT_COMPLETION
    assert dict(meta.column_mapping.columns) == {"prompt": "question", "completion": "answer"}
    assert (meta.split.train_fraction, meta.split.validation_fraction, meta.split.test_fraction,
            meta.split.seed) == (0.7, 0.2, 0.1, 7)
    assert (meta.min_examples, meta.tokenizer, meta.max_length, meta.issue_limit, meta.request_id) == (
        10, "tok", 512, 5, "r1")
    assert (meta.options.max_samples, meta.options.system_prompt, meta.options.prompt_template) == (
        100, "Be brief.", "Q: {prompt}")
    # Unset options stay unset, so the server's defaults apply (they differ with --validation-dataset).
    bare = build_metadata(qa_csv, name="qa", validation_dataset="other")
    assert not bare.split.HasField("validation_fraction") and not bare.split.HasField("train_fraction")
    assert not bare.HasField("min_examples") and not bare.HasField("issue_limit")
    assert not bare.options.HasField("max_samples") and bare.validation_dataset == "other"


@pytest.mark.parametrize(("option", "kwargs", "says"), [
    ("--min-examples", {"min_examples": 0}, "at least 1"),
    ("--max-samples", {"max_samples": 0}, "at least 1"),
    ("--max-samples", {"max_samples": 2**63}, "at most"),
    ("--max-length", {"max_length": -1}, "between 0 and"),
    ("--max-length", {"max_length": 2**31}, "between 0 and"),
    ("--issue-limit", {"issue_limit": 0}, "between 1 and 1000"),
    ("--issue-limit", {"issue_limit": 1001}, "between 1 and 1000"),
    ("--train", {"train": 1.5}, "fraction in [0, 1]"),
    ("--test", {"test": -0.1}, "fraction in [0, 1]"),
    ("--seed", {"seed": -1}, "must not be negative"),
    ("--validation", {"validation": 0.1, "validation_dataset": "other"}, "must be 0"),
    ("--prompt-template", {"prompt_template": "Q:"}, "{prompt}"),
])
def test_a_bad_option_is_refused_by_its_name(qa_csv: Path, option: str, kwargs: dict[str, object],
                                             says: str) -> None:
    assert says in refused(option, build_metadata, qa_csv, **kwargs)


def test_server_fields_are_named_as_the_options_that_set_them() -> None:
    assert option_of("metadata.options.max_samples") == "--max-samples"
    assert option_of("metadata.column_mapping.columns[prompt]") == "--column-mapping"
    assert option_of("metadata.split") == "--train/--validation/--test"
    assert option_of("metadata.unknown") == "metadata.unknown"
    assert as_options("at least 100 are required (metadata.min_examples).") == \
        "at least 100 are required (--min-examples)."


# -- encodings --------------------------------------------------------------------------------------

ROWS = [json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                 {"role": "assistant", "content": f"a{i}"}]}) for i in range(5)]


@pytest.mark.parametrize(("encoding", "named", "order"), [
    ("utf-16", "UTF-16", "with a byte-order mark"),
    ("utf-16-le", "UTF-16", "little-endian, no byte-order mark"),
    ("utf-16-be", "UTF-16", "big-endian, no byte-order mark"),
    ("utf-32", "UTF-32", "with a byte-order mark"),
])
def test_a_wide_encoding_is_named(tmp_path: Path, encoding: str, named: str, order: str) -> None:
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(ROWS), encoding=encoding)
    problem = encoding_problem(path)
    assert problem is not None and f"chat.jsonl is {named} (" in problem and order in problem
    # The command works from any folder: the file as given, the converted one beside it.
    converted = shlex.quote(str(tmp_path / "chat.utf8.jsonl"))
    assert f"iconv -f {named} -t UTF-8 {shlex.quote(str(path))} > {converted}" in problem


def test_utf8_with_or_without_a_bom_is_fine(tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(ROWS), encoding="utf-8-sig")
    assert encoding_problem(path) is None
    path.write_text("\n".join(ROWS), encoding="utf-8")
    assert encoding_problem(path) is None


# -- summaries ----------------------------------------------------------------------------------------

MISSING = 'The example has no "messages" field; each line must look like {"messages": [...]}.'


def test_every_line_failing_the_same_way_is_said_once_with_the_count() -> None:
    problems = [Problem(n, "MISSING_MESSAGES", MISSING, "messages") for n in range(2, 152)]
    lines = summary_lines(problems, examples_checked=150, error_count=150)
    assert lines[0] == f"every example fails the same way (150 of 150): MISSING_MESSAGES: {MISSING}"
    assert lines[1] == "  e.g. lines 2, 3, 4, …"
    assert len(lines) == 2


def test_listed_issues_of_a_larger_count_are_not_called_all_of_them() -> None:
    problems = [Problem(n, "MISSING_MESSAGES", MISSING) for n in range(1, 101)]
    lines = summary_lines(problems, examples_checked=5000, error_count=5000, truncated=True)
    assert lines[0].startswith("every example has an error (5000 of 5000); the 100 listed are all "
                               "MISSING_MESSAGES")
    lines = summary_lines(problems, examples_checked=5000, error_count=300, truncated=True)
    assert lines[0].startswith("300 errors, the 100 listed all MISSING_MESSAGES")


def test_kinds_of_errors_are_grouped_most_frequent_first_with_a_few_examples() -> None:
    problems = [Problem(3, "INVALID_JSON", "Expecting value at 1."),
                *(Problem(n, "INVALID_ROLE", f"role 'bot{n}' is not one of user, assistant",
                          "messages[0].role") for n in range(4, 10))]
    lines = summary_lines(problems, examples_checked=10, error_count=7)
    assert lines[0].startswith("6 lines: INVALID_ROLE: role 'bot4'")
    assert lines[1:4] == [f"  line {n} (messages[0].role): role 'bot{n}' is not one of user, assistant"
                          for n in (4, 5, 6)]
    assert lines[4] == "  … and 3 more"
    assert lines[5:] == ["1 line: INVALID_JSON: Expecting value at 1.", "  e.g. line 3"]


def test_the_cause_leads_and_too_few_examples_follows(tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(ROWS), encoding="utf-16")
    problems = [Problem(0, "TOO_FEW_EXAMPLES", "The file has 0 examples; at least 100 are required "
                        "(metadata.min_examples)."),
                Problem(1, "INVALID_UTF8", "The file is not valid UTF-8 (byte 0xff) after line 0.")]
    lines = summary_lines(problems, examples_checked=0, error_count=2, path=path)
    assert lines[0].startswith("chat.jsonl is UTF-16")
    assert lines[1:] == ["so: The file has 0 examples; at least 100 are required (--min-examples)."]


def test_a_csv_without_a_mapping_is_told_its_columns(tmp_path: Path) -> None:
    path = tmp_path / "qa.csv"
    path.write_text("question,answer\nq,a\n")
    lines = summary_lines([Problem(2, "MISSING_MESSAGES", MISSING)], examples_checked=1, error_count=1,
                          path=path)
    assert lines[-1] == ("the file's columns are question, answer: name the fields they hold with "
                         "--column-mapping COLUMN=FIELD, e.g. "
                         "--column-mapping question=prompt,answer=completion")
    assert not any("columns are" in line for line in summary_lines(
        [Problem(2, "MISSING_MESSAGES", MISSING)], path=path, column_mapping={"prompt": "question"}))


def test_violations_of_a_refused_upload_read_back_as_problems() -> None:
    from services.datasets.domain import Issue, Severity

    issues = [Issue(Severity.ERROR, "MISSING_MESSAGES", n, MISSING, "messages") for n in range(1, 101)]
    problems = from_violations(bounded_violations(issues))
    assert problems[0] == Problem(1, "MISSING_MESSAGES", MISSING, "messages")
    assert {p.code for p in problems} == {"MISSING_MESSAGES"} and all(p.line for p in problems)
    lines = summary_lines(problems, error_count=399, truncated=True)
    assert lines[0].startswith(f"399 errors, the {len(problems)} listed all MISSING_MESSAGES: {MISSING}")
    assert lines[1] == "  e.g. lines 1, 2, 3, …"  # the ones cut to their code alone are not listed apart


def test_a_valid_report_says_so_with_its_warnings() -> None:
    report = dataset_pb2.ValidationReport(
        valid=True, format=dataset_pb2.DATASET_FORMAT_PROMPT_COMPLETION, examples_checked=3, warning_count=2,
        statistics=dataset_pb2.DatasetStatistics(example_count=3, duplicate_count=1),
        issues=[dataset_pb2.ValidationIssue(severity=dataset_pb2.ISSUE_SEVERITY_WARNING,
                                            code="DUPLICATE_EXAMPLES", line=n, message="A duplicate.")
                for n in (2, 3)])
    assert report_lines(report) == ["valid: 3 examples, format PROMPT_COMPLETION, 2 warnings",
                                     "duplicates: 1", "warning DUPLICATE_EXAMPLES (2 lines): A duplicate."]


# -- tables -----------------------------------------------------------------------------------------

def render(table: Table, width: int) -> str:
    out = StringIO()
    Console(file=out, width=width, color_system=None).print(table)
    return out.getvalue()


def test_ids_are_never_cut_however_narrow_the_terminal() -> None:
    datasets = [dataset_pb2.Dataset(id=f"ds_01m8w5yd5pg1enamaxzx7x16a{i}", name=f"a-rather-long-name-{i}",
                                    state=dataset_pb2.DATASET_STATE_READY,
                                    format=dataset_pb2.DATASET_FORMAT_PROMPT_COMPLETION) for i in range(3)]
    for width in (40, 80, 120, 250):
        text = render(dataset_table(datasets), width)
        assert "…" not in text, text
        for d in datasets:
            assert d.id in text and d.name in text and "PROMPT_COMPLETION" in text
    assert "┃ ID" in render(dataset_table(datasets), 250)  # a table when it fits
    narrow = render(dataset_table(datasets), 60)
    assert "┃" not in narrow and narrow.count("ID  ") == 3  # one block per row when it does not


def test_whole_ids_keeps_a_table_that_fits() -> None:
    table = Table("ID", "STATE")
    table.add_row("job_1", "QUEUED")
    assert "│ job_1 │ QUEUED │" in render(whole_ids(table), 80)


def test_an_import_error_names_the_options_not_the_request_fields() -> None:
    assert import_as_options("Could not reach S3 at AWS to read s3://b/qa.csv; check source.endpoint_url, "
                             "or retry later.") == ("Could not reach S3 at AWS to read s3://b/qa.csv; check "
                                                    "--endpoint-url, or retry later.")
    assert import_as_options("options.max_samples must be at least 1; see credentials.huggingface_token") == (
        "--max-samples must be at least 1; see --env-credentials (HF_TOKEN)")
    unchanged = "s3://bucket/source.csv stays as it is"
    assert import_as_options(unchanged) == unchanged
