"""The content validator: each defect with its stable code, line, field and message index."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from services.datasets import validation as v
from services.datasets.domain import DatasetFormat, DatasetOptions, Severity
from services.datasets.issues import IssueCode
from tests.datasets.helpers import chat_lines, write_jsonl
from trainer_worker.tiny_vlm import write_image_dataset_zip


def _with_line_3(tmp_path: Path, line: str, n: int = 5) -> Path:
    lines = chat_lines(n)
    lines[2] = line
    return write_jsonl(tmp_path / "data.jsonl", lines)


def _msgs(*messages: object) -> str:
    return json.dumps({"messages": list(messages)})


USER = {"role": "user", "content": "hi"}
ASSISTANT = {"role": "assistant", "content": "hello"}

DEFECTS = [
    ('{"messages": [', IssueCode.INVALID_JSON, "", None),
    ("[1, 2, 3]", IssueCode.NOT_AN_OBJECT, "", None),
    ('"just a string"', IssueCode.NOT_AN_OBJECT, "", None),
    (json.dumps({"conversation": []}), IssueCode.MISSING_MESSAGES, "messages", None),
    (json.dumps({"messages": "hi"}), IssueCode.MESSAGES_NOT_A_LIST, "messages", None),
    (json.dumps({"messages": []}), IssueCode.EMPTY_MESSAGES, "messages", None),
    (_msgs(USER, "hello"), IssueCode.MESSAGE_NOT_AN_OBJECT, "messages[1]", 1),
    (_msgs({"content": "hi"}, ASSISTANT), IssueCode.MISSING_ROLE, "messages[0].role", 0),
    (_msgs(USER, {"role": "bot", "content": "x"}), IssueCode.INVALID_ROLE, "messages[1].role", 1),
    (_msgs(USER, {"role": 3, "content": "x"}), IssueCode.INVALID_ROLE, "messages[1].role", 1),
    (_msgs({"role": "user"}, ASSISTANT), IssueCode.MISSING_CONTENT, "messages[0].content", 0),
    (_msgs(USER, {"role": "assistant", "content": None}), IssueCode.CONTENT_NOT_A_STRING,
     "messages[1].content", 1),
    (_msgs(USER, {"role": "assistant", "content": [{"type": "text"}]}), IssueCode.INVALID_CONTENT_PART,
     "messages[1].content[0]", 1),
    (_msgs(USER, {"role": "assistant", "content": "  "}), IssueCode.EMPTY_CONTENT, "messages[1].content", 1),
    (_msgs(USER, {**ASSISTANT, "weight": 0.5}), IssueCode.INVALID_WEIGHT, "messages[1].weight", 1),
    (_msgs(USER, {**ASSISTANT, "weight": True}), IssueCode.INVALID_WEIGHT, "messages[1].weight", 1),
    (_msgs(USER, {**ASSISTANT, "weight": "1"}), IssueCode.INVALID_WEIGHT, "messages[1].weight", 1),
    (_msgs(USER, {"role": "system", "content": "x"}), IssueCode.MISSING_ASSISTANT_TURN, "messages", None),
]


@pytest.mark.parametrize(("line", "code", "field", "index"), DEFECTS,
                         ids=[f"{d[1]}-{d[0][:20]}" for d in DEFECTS])
def test_each_defect_is_reported_on_its_line(tmp_path: Path, line: str, code: str, field: str,
                                             index: int | None) -> None:
    report = v.validate_file(_with_line_3(tmp_path, line), min_examples=1)
    assert not report.valid
    assert report.error_count == 1, report.issues
    issue = report.issues[0]
    assert (issue.code, issue.line, issue.field, issue.message_index) == (code, 3, field, index)
    assert issue.severity is Severity.ERROR
    assert issue.message.endswith(".") and len(issue.message) > 15
    assert report.examples_checked == 5 and report.statistics.example_count == 4


def test_non_utf8_line(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    lines = [line.encode() for line in chat_lines(4)]
    lines[1] = b'{"messages": [{"role": "user", "content": "caf\xe9"}]}'
    path.write_bytes(b"\n".join(lines) + b"\n")
    report = v.validate_file(path, min_examples=1)
    assert [(i.code, i.line) for i in report.issues] == [(IssueCode.INVALID_UTF8, 2)]
    assert "0xe9" in report.issues[0].message


def test_every_problem_of_a_line_is_reported(tmp_path: Path) -> None:
    line = _msgs({"role": "usr", "content": ""}, {"role": "assistant", "content": "x", "weight": 2})
    report = v.validate_file(_with_line_3(tmp_path, line), min_examples=1)
    assert [(i.code, i.field) for i in report.issues] == [
        (IssueCode.INVALID_ROLE, "messages[0].role"), (IssueCode.EMPTY_CONTENT, "messages[0].content"),
        (IssueCode.INVALID_WEIGHT, "messages[1].weight")]
    assert report.issues[0].location() == "line 3: messages[0].role"


def test_blank_lines_and_a_bom_are_ignored_but_keep_line_numbers(tmp_path: Path) -> None:
    lines = chat_lines(3)
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + f"{lines[0]}\r\n\n   \n{lines[1]}\n{{bad\n\n{lines[2]}\n\n".encode())
    report = v.validate_file(path, min_examples=1)
    assert report.examples_checked == 4 and report.statistics.example_count == 3
    assert [(i.code, i.line) for i in report.issues] == [(IssueCode.INVALID_JSON, 5)]


def test_too_few_examples_is_a_dataset_level_error(tmp_path: Path) -> None:
    report = v.validate_file(write_jsonl(tmp_path / "d.jsonl", chat_lines(99)))
    assert [(i.code, i.line, i.location()) for i in report.issues] == [
        (IssueCode.TOO_FEW_EXAMPLES, 0, "file")]
    assert "99 examples" in report.issues[0].message and "100" in report.issues[0].message
    assert v.validate_file(write_jsonl(tmp_path / "e.jsonl", chat_lines(100))).valid
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert v.validate_file(empty, min_examples=1).issues[0].code == IssueCode.EMPTY_FILE


def test_more_than_ten_percent_duplicates_is_a_warning(tmp_path: Path) -> None:
    lines = chat_lines(20)
    ten_percent = [*lines[:18], lines[0], lines[1]]
    assert v.validate_file(write_jsonl(tmp_path / "a.jsonl", ten_percent), min_examples=1).warning_count == 0
    # Same example with another key order and spacing: a duplicate after normalization.
    respaced = json.dumps(json.loads(lines[2]), indent=None, separators=(", ", " : "))
    more = [*lines[:17], lines[0], lines[1], respaced]
    report = v.validate_file(write_jsonl(tmp_path / "b.jsonl", more), min_examples=1)
    assert report.valid and report.warning_count == 1
    issue = report.issues[0]
    assert (issue.code, issue.severity, issue.line) == (IssueCode.DUPLICATE_EXAMPLES, Severity.WARNING, 0)
    assert "(the first on line 18)" in issue.message
    assert report.statistics.duplicate_count == 3


def test_all_weights_zero_is_a_warning(tmp_path: Path) -> None:
    line = _msgs(USER, {**ASSISTANT, "weight": 0})
    report = v.validate_file(_with_line_3(tmp_path, line), min_examples=1)
    assert report.valid
    assert [(i.code, i.line, i.severity) for i in report.issues] == [
        (IssueCode.NO_TRAINABLE_TURN, 3, Severity.WARNING)]


def test_issues_are_capped_but_counted(tmp_path: Path) -> None:
    lines = ["nope"] * 150 + chat_lines(3)
    report = v.validate_file(write_jsonl(tmp_path / "d.jsonl", lines), min_examples=1, issue_limit=100)
    assert report.error_count == 150 and len(report.issues) == 100 and report.issues_truncated
    assert [i.line for i in report.issues] == list(range(1, 101))


def test_statistics_and_normalized_output(tmp_path: Path) -> None:
    lines = [json.dumps({"id": 1, "messages": [{"content": "ab", "role": "user", "name": "x"},
                                              {"role": "assistant", "content": "cde", "weight": 1.0}]}),
             json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "é"},
                                      {"role": "assistant", "content": "ok"}]})]
    out = io.BytesIO()
    report = v.validate_file(write_jsonl(tmp_path / "d.jsonl", lines), min_examples=1, normalized_out=out)
    assert report.valid and report.format is DatasetFormat.OPENAI_CHAT
    stats = report.statistics
    assert (stats.example_count, stats.mean_messages_per_example, stats.total_characters) == (2, 2.5, 9)
    assert out.getvalue().decode().splitlines() == [
        '{"messages":[{"role":"user","content":"ab"},{"role":"assistant","content":"cde","weight":1}]}',
        '{"messages":[{"role":"system","content":"s"},{"role":"user","content":"é"},'
        '{"role":"assistant","content":"ok"}]}']


def test_the_longest_example_in_bytes_on_either_path(tmp_path: Path) -> None:
    """DatasetStatistics.longest_example_bytes: the longest kept example's line, as read on the fast path
    (windows of plain chat lines past the first 100), as normalized where validation rewrote it."""
    lines = chat_lines(600)
    long_line = json.dumps({"messages": [{"role": "user", "content": "é" * 2000},
                                         {"role": "assistant", "content": "y"}]}, ensure_ascii=False)
    lines[400] = long_line
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    assert v.validate_file(path, min_examples=1).statistics.longest_example_bytes == len(long_line.encode())
    # Only kept examples count: max_samples leaves the long one out.
    cut = v.validate_file(path, min_examples=1, options=DatasetOptions(max_samples=300)).statistics
    assert cut.example_count == 300
    assert cut.longest_example_bytes == max(len(line.encode()) for line in lines[:300])
    # A system prompt rewrites every example: the normalized line, with it, is what is measured.
    out = io.BytesIO()
    prompted = v.validate_file(path, min_examples=1, normalized_out=out,
                               options=DatasetOptions(system_prompt="Be brief.")).statistics
    assert prompted.longest_example_bytes == max(map(len, out.getvalue().splitlines()))
    # The first 100 lines take the per-line path: measured there too.
    lines = chat_lines(50)
    lines[10] = long_line
    compact = long_line.replace(", ", ",").replace(": ", ":")  # as normalized
    stats = v.validate_file(write_jsonl(tmp_path / "e.jsonl", lines), min_examples=1).statistics
    assert stats.longest_example_bytes == len(compact.encode())


def test_no_longest_example_bytes_for_a_dataset_with_images(tmp_path: Path) -> None:
    archive = write_image_dataset_zip(tmp_path / "pictures.zip", n=20)
    stats = v.validate_file(archive, min_examples=1).statistics
    assert stats.example_count == 20 and stats.longest_example_bytes == 0


@pytest.mark.parametrize(("record", "expected"), [
    ({"messages": []}, DatasetFormat.OPENAI_CHAT),
    ({"conversations": []}, DatasetFormat.SHAREGPT),
    ({"instruction": "a", "input": "", "output": "b"}, DatasetFormat.ALPACA),
    ({"prompt": "a", "completion": "b"}, DatasetFormat.PROMPT_COMPLETION),
    ({"prompt": "a", "chosen": "b", "rejected": "c"}, DatasetFormat.PREFERENCE),
    ({"input": {}, "preferred_output": [], "non_preferred_output": []}, DatasetFormat.OPENAI_PREFERENCE),
    ({"prompt": "a", "answer": 1}, DatasetFormat.PROMPT_ONLY),
    ({"text": "a"}, DatasetFormat.TEXT),
    ({"foo": "a"}, None),
])
def test_format_detection(tmp_path: Path, record: dict[str, object], expected: DatasetFormat | None) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", ["not json", json.dumps(record), json.dumps(record)])
    assert v.detect_format(path) is expected


def test_unrecognized_content_is_checked_as_chat(tmp_path: Path) -> None:
    lines = [json.dumps({"question": "q", "answer": "a"})] * 3
    report = v.validate_file(write_jsonl(tmp_path / "d.jsonl", lines), min_examples=1)
    assert report.format is DatasetFormat.OPENAI_CHAT
    assert [(i.code, i.line) for i in report.issues] == [(IssueCode.MISSING_MESSAGES, n) for n in (1, 2, 3)]


def test_two_objects_on_one_line_past_the_detection_window_is_invalid_json(tmp_path: Path) -> None:
    """Past the first 100 lines the fast path takes over; a line holding two objects must still be one
    INVALID_JSON on its own line, and the lines around it keep their own numbers (an earlier batch decoder
    read such a line as two rows and crashed)."""
    lines = chat_lines(150)
    lines[119] = f"{lines[0]}, {lines[1]}"
    lines[129] = _msgs({"role": "robot", "content": "x"}, ASSISTANT)
    report = v.validate_file(write_jsonl(tmp_path / "data.jsonl", lines), min_examples=1)
    assert [(i.code, i.line) for i in report.errors] == [
        (IssueCode.INVALID_JSON, 120), (IssueCode.INVALID_ROLE, 130)]
    assert report.statistics.example_count == 148
