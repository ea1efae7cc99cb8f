"""Every format: detection by content, its normalized shape, its defects; options; CSV and Parquet."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from services.datasets import readers as r
from services.datasets import validation as v
from services.datasets.domain import DatasetFormat, DatasetOptions, Severity, ValidationReport
from services.datasets.issues import IssueCode
from tests.datasets.helpers import chat_lines, write_jsonl

U = {"role": "user", "content": "q"}
A = {"role": "assistant", "content": "a"}
B = {"role": "assistant", "content": "b"}

# (source row, detected format, normalized row): the contract with the trainer.
SHAPES: list[tuple[dict[str, Any], DatasetFormat, dict[str, Any]]] = [
    (
        {"messages": [U, {**A, "weight": 1.0}]},
        DatasetFormat.OPENAI_CHAT,
        {"messages": [U, {**A, "weight": 1}]},
    ),
    (
        {
            "messages": [
                U,
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"x": 1}'}}
                    ],
                },
                {"role": "tool", "content": "2", "tool_call_id": "c1"},
                A,
            ]
        },
        DatasetFormat.OPENAI_CHAT,
        {
            "messages": [
                U,
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "add", "arguments": {"x": 1}}}
                    ],
                },
                {"role": "tool", "content": "2"},
                A,
            ]
        },
    ),
    (
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "q"}]}, A]},
        DatasetFormat.OPENAI_CHAT,
        {"messages": [U, A]},
    ),
    (
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "system": "s"},
        DatasetFormat.SHAREGPT,
        {"messages": [{"role": "system", "content": "s"}, U, A]},
    ),
    (
        {"instruction": "Do", "input": "this", "output": "a"},
        DatasetFormat.ALPACA,
        {"messages": [{"role": "user", "content": "Do\n\nthis"}, A]},
    ),
    ({"instruction": "q", "input": "", "output": "a"}, DatasetFormat.ALPACA, {"messages": [U, A]}),
    ({"text": "t"}, DatasetFormat.TEXT, {"text": "t"}),
    ({"prompt": "p", "completion": "c"}, DatasetFormat.PROMPT_COMPLETION, {"prompt": "p", "completion": "c"}),
    ({"prompt": [U], "completion": [A]}, DatasetFormat.PROMPT_COMPLETION, {"prompt": [U], "completion": [A]}),
    (
        {"prompt": "p", "completion": "c", "label": False},
        DatasetFormat.KTO,
        {"prompt": "p", "completion": "c", "label": False},
    ),
    (
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        DatasetFormat.PREFERENCE,
        {"prompt": "p", "chosen": "a", "rejected": "b"},
    ),
    (
        {"prompt": [U], "chosen": [A], "rejected": [B]},
        DatasetFormat.PREFERENCE,
        {"prompt": [U], "chosen": [A], "rejected": [B]},
    ),
    (
        {"input": {"messages": [U]}, "preferred_output": [A], "non_preferred_output": [B]},
        DatasetFormat.OPENAI_PREFERENCE,
        {"prompt": [U], "chosen": [A], "rejected": [B]},
    ),
    (
        {"prompt": [U], "answer": "42", "meta": {"k": [1]}},
        DatasetFormat.PROMPT_ONLY,
        {"prompt": [U], "answer": "42", "meta": {"k": [1]}},
    ),
]


def _validate(tmp_path: Path, rows: list[Any], **kwargs: Any) -> tuple[ValidationReport, list[Any]]:
    path = write_jsonl(tmp_path / "d.jsonl", [r if isinstance(r, str) else json.dumps(r) for r in rows])
    out = io.BytesIO()
    report = v.validate_file(path, min_examples=1, normalized_out=out, **kwargs)
    return report, [json.loads(line) for line in out.getvalue().splitlines()]


@pytest.mark.parametrize(
    ("row", "fmt", "normalized"), SHAPES, ids=[f"{s[1].value}-{i}" for i, s in enumerate(SHAPES)]
)
def test_each_format_is_detected_and_normalized(
    tmp_path: Path, row: dict[str, Any], fmt: DatasetFormat, normalized: dict[str, Any]
) -> None:
    report, out = _validate(tmp_path, [row, row])
    assert report.format is fmt
    assert report.error_count == 0, report.issues
    assert out == [normalized, normalized]


def _first(tmp_path: Path, row: Any, fmt: DatasetFormat) -> list[tuple[str, int, str]]:
    report, _ = _validate(tmp_path, [row], format=fmt)
    return [(i.code, i.line, i.field) for i in report.issues]


@pytest.mark.parametrize(
    ("row", "fmt", "expected"),
    [
        (
            {"messages": [U, A, {"role": "assistant", "content": "again"}]},
            DatasetFormat.OPENAI_CHAT,
            [(IssueCode.ROLES_NOT_ALTERNATING, 1, "messages[2].role")],
        ),
        (
            {"messages": [U, {"role": "system", "content": "s"}, A]},
            DatasetFormat.OPENAI_CHAT,
            [(IssueCode.SYSTEM_NOT_FIRST, 1, "messages[1].role")],
        ),
        (
            {"messages": [U, {"role": "tool", "content": "x"}, A]},
            DatasetFormat.OPENAI_CHAT,
            [(IssueCode.TOOL_WITHOUT_CALL, 1, "messages[1].role")],
        ),
        (
            {
                "messages": [
                    U,
                    {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]},
                ]
            },
            DatasetFormat.OPENAI_CHAT,
            [(IssueCode.INVALID_TOOL_CALL, 1, "messages[1].tool_calls[0].function.arguments")],
        ),
        (
            {"messages": [U, {**A, "mood": "happy"}]},
            DatasetFormat.OPENAI_CHAT,
            [(IssueCode.UNKNOWN_FIELD, 1, "messages[1].mood")],
        ),
        (
            {"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]},
            DatasetFormat.SHAREGPT,
            [(IssueCode.INVALID_ROLE, 1, "conversations[1].from")],
        ),
        ({"instruction": "q", "output": 3}, DatasetFormat.ALPACA, [(IssueCode.WRONG_TYPE, 1, "output")]),
        (
            {"instruction": " ", "output": "a"},
            DatasetFormat.ALPACA,
            [(IssueCode.EMPTY_VALUE, 1, "instruction")],
        ),
        ({"text": ""}, DatasetFormat.TEXT, [(IssueCode.EMPTY_VALUE, 1, "text")]),
        ({"prompt": "p"}, DatasetFormat.PROMPT_COMPLETION, [(IssueCode.MISSING_FIELD, 1, "completion")]),
        (
            {"prompt": "p", "completion": [A]},
            DatasetFormat.PROMPT_COMPLETION,
            [(IssueCode.MIXED_SHAPES, 1, "prompt")],
        ),
        (
            {"prompt": "p", "completion": "c", "label": "yes"},
            DatasetFormat.KTO,
            [(IssueCode.INVALID_LABEL, 1, "label")],
        ),
        (
            {"prompt": "p", "chosen": "a", "rejected": [B]},
            DatasetFormat.PREFERENCE,
            [(IssueCode.MIXED_SHAPES, 1, "prompt")],
        ),
        (
            {"prompt": [U], "chosen": [U], "rejected": [B]},
            DatasetFormat.PREFERENCE,
            [(IssueCode.MISSING_ASSISTANT_TURN, 1, "chosen")],
        ),
        (
            {"prompt": "p", "chosen": "a", "rejected": "a"},
            DatasetFormat.PREFERENCE,
            [(IssueCode.IDENTICAL_PAIR, 1, "chosen")],
        ),
        (
            {"input": [U], "preferred_output": [A], "non_preferred_output": [B]},
            DatasetFormat.OPENAI_PREFERENCE,
            [(IssueCode.WRONG_TYPE, 1, "input")],
        ),
        ({"prompt": 7}, DatasetFormat.PROMPT_ONLY, [(IssueCode.WRONG_TYPE, 1, "prompt")]),
    ],
)
def test_format_defects(
    tmp_path: Path, row: dict[str, Any], fmt: DatasetFormat, expected: list[tuple[str, int, str]]
) -> None:
    assert _first(tmp_path, row, fmt) == expected


def test_a_file_mixing_formats_says_which_lines_look_like_what(tmp_path: Path) -> None:
    rows: list[Any] = [json.loads(line) for line in chat_lines(6)]
    rows[2] = {"instruction": "q", "output": "a"}
    rows[4] = {"prompt": "p", "chosen": "a", "rejected": "b"}
    report, out = _validate(tmp_path, rows)
    assert report.format is DatasetFormat.OPENAI_CHAT and len(out) == 4
    assert [(i.code, i.line) for i in report.issues] == [
        (IssueCode.MIXED_FORMATS, 0),
        (IssueCode.FORMAT_MISMATCH, 3),
        (IssueCode.FORMAT_MISMATCH, 5),
    ]
    mixed = report.issues[0].message
    assert "ALPACA on 1 line(s) (first: 3)" in mixed and "PREFERENCE on 1 line(s) (first: 5)" in mixed
    assert "looks like ALPACA" in report.issues[1].message


def test_a_named_format_is_checked_even_if_content_says_otherwise(tmp_path: Path) -> None:
    report, _ = _validate(tmp_path, [{"text": "t"}], format=DatasetFormat.OPENAI_CHAT)
    assert report.format is DatasetFormat.OPENAI_CHAT
    assert [i.code for i in report.issues] == [IssueCode.MIXED_FORMATS, IssueCode.FORMAT_MISMATCH]
    assert "named in metadata.format" in report.issues[1].message


def test_options_max_samples_system_prompt_and_template(tmp_path: Path) -> None:
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, A]} for i in range(5)]
    options = DatasetOptions(max_samples=3, system_prompt="Be brief.", prompt_template="Q: {prompt}")
    report, out = _validate(tmp_path, rows, options=options)
    assert report.valid and report.statistics.example_count == 3
    assert report.statistics.dropped_by_max_samples == 2
    assert out[1] == {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q: q1"}, A]
    }
    in_template = DatasetOptions(
        system_prompt="S", prompt_template="<system> {system_prompt} <user> {prompt}"
    )
    _, out = _validate(tmp_path, [{"prompt": "p", "completion": "c"}], options=in_template)
    assert out == [{"prompt": "<system> S <user> p", "completion": "c"}]
    _, out = _validate(
        tmp_path, [{"prompt": "p", "completion": "c"}], options=DatasetOptions(system_prompt="S")
    )
    assert out == [{"prompt": "S\n\np", "completion": "c"}]


def test_class_imbalance_is_a_warning(tmp_path: Path) -> None:
    rows = [{"prompt": f"review {i}", "completion": "positive" if i % 12 else "negative"} for i in range(120)]
    report, _ = _validate(tmp_path, rows)
    assert report.valid
    issue = next(i for i in report.issues if i.code == IssueCode.CLASS_IMBALANCE)
    assert (
        issue.severity is Severity.WARNING
        and "'positive' has 110" in issue.message
        and "11:1" in issue.message
    )
    balanced = [
        {"prompt": f"review {i}", "completion": "positive" if i % 2 else "negative"} for i in range(120)
    ]
    assert IssueCode.CLASS_IMBALANCE not in [i.code for i in _validate(tmp_path, balanced)[0].issues]
    free_text = [{"prompt": f"q {i}", "completion": f"answer {i}"} for i in range(120)]
    assert IssueCode.CLASS_IMBALANCE not in [i.code for i in _validate(tmp_path, free_text)[0].issues]


def test_csv_with_a_column_mapping(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text('question,answer,source\n"What is 1+1?","2",web\n"multi\nline",x,book\nonly,two\n')
    out = io.BytesIO()
    report = v.validate_file(
        path,
        min_examples=1,
        normalized_out=out,
        column_mapping={"prompt": "question", "completion": "answer"},
    )
    assert report.format is DatasetFormat.PROMPT_COMPLETION and report.examples_checked == 3
    # Unmapped columns are unknown to this format: a warning each, and dropped.
    assert [(i.code, i.line) for i in report.issues if i.severity is Severity.ERROR] == [
        (IssueCode.CSV_COLUMN_COUNT, 5)
    ]
    assert [json.loads(x) for x in out.getvalue().splitlines()] == [
        {"prompt": "What is 1+1?", "completion": "2"},
        {"prompt": "multi\nline", "completion": "x"},
    ]
    missing = v.validate_file(path, min_examples=1, column_mapping={"prompt": "nope"})
    issues = [(i.code, i.line, i.field) for i in missing.issues]
    assert (IssueCode.MISSING_COLUMN, 1, "column_mapping") in issues


def test_jsonl_with_a_column_mapping_renames_keys(tmp_path: Path) -> None:
    # What a Hugging Face import writes (JSONL rows with the source's own column names), or a user's JSONL.
    path = tmp_path / "d.jsonl"
    rows = [{"question": f"q {i}", "answer": f"a {i}", "source": "web"} for i in range(3)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + "[1]\n")
    assert r.sniff(path, has_mapping=True) is r.SourceKind.JSONL
    out = io.BytesIO()
    mapping = {"prompt": "question", "completion": "answer"}
    report = v.validate_file(path, min_examples=1, normalized_out=out, column_mapping=mapping)
    assert report.format is DatasetFormat.PROMPT_COMPLETION and report.examples_checked == 4
    assert [(i.code, i.line) for i in report.issues if i.severity is Severity.ERROR] == [
        (IssueCode.NOT_AN_OBJECT, 4)
    ]
    assert [json.loads(x) for x in out.getvalue().splitlines()] == [
        {"prompt": f"q {i}", "completion": f"a {i}"} for i in range(3)
    ]
    missing = v.validate_file(path, min_examples=1, column_mapping={"prompt": "nope"})
    (issue,) = [i for i in missing.issues if i.code is IssueCode.MISSING_COLUMN]
    assert (issue.line, issue.field) == (1, "column_mapping") and "prompt <- nope" in issue.message
    assert "answer, question, source" in issue.message and missing.examples_checked == 0


def test_a_one_column_csv_with_a_mapping_is_still_csv(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("text\nhello\n")
    assert r.sniff(path, has_mapping=True) is r.SourceKind.CSV
    assert r.sniff(path) is r.SourceKind.CSV


def test_csv_cells_holding_json_messages(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    messages = json.dumps([U, A]).replace('"', '""')
    path.write_text(f'messages\n"{messages}"\n"{messages}"\n')
    report = v.validate_file(path, min_examples=1)
    assert (
        report.format is DatasetFormat.OPENAI_CHAT and report.valid and report.statistics.example_count == 2
    )


def test_parquet_in_batches_with_nested_messages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(r, "PARQUET_BATCH_ROWS", 3)
    rows = [
        {
            "msgs": [
                {"role": "user", "content": f"q{i}"},
                {"role": "assistant", "content": "a" if i != 4 else ""},
            ]
        }
        for i in range(7)
    ]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    out = io.BytesIO()
    report = v.validate_file(path, min_examples=1, normalized_out=out, column_mapping={"messages": "msgs"})
    assert report.format is DatasetFormat.OPENAI_CHAT and report.examples_checked == 7
    assert [(i.code, i.line, i.field) for i in report.issues] == [
        (IssueCode.EMPTY_CONTENT, 5, "messages[1].content")
    ]
    assert len(out.getvalue().splitlines()) == 6


def test_container_is_sniffed_from_content_not_name(tmp_path: Path) -> None:
    jsonl = write_jsonl(tmp_path / "data.csv", chat_lines(2))
    assert r.sniff(jsonl) is r.SourceKind.JSONL
    csv_file = tmp_path / "data.jsonl"
    csv_file.write_text("prompt,completion\na,b\n")
    assert r.sniff(csv_file) is r.SourceKind.CSV
    parquet = tmp_path / "data.txt"
    pq.write_table(pa.Table.from_pylist([{"text": "t"}]), parquet)
    assert r.sniff(parquet) is r.SourceKind.PARQUET
