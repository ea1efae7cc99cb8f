"""How the CLI tells what is wrong with a dataset: the cause first, once.

A validation report (or an upload refused with DATASET_INVALID, whose field violations are the first
errors) lists one issue per line, and a file that fails the same way on every line used to print a
hundred copies of one sentence. `summary_lines` leads with what explains the rest (a file that is not
UTF-8, a file-level problem), then each kind of error once with how many lines have it and a few of them,
and the too-few-examples count last, since it follows from the rest.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tuneforge.v1 import dataset_pb2

from services.cli.dataset_options import csv_header, encoding_problem, import_option_of, option_of

EXAMPLES_SHOWN = 3
# Issues that follow from others: printed after them.
CONSEQUENCES = frozenset({"TOO_FEW_EXAMPLES"})
# The errors a CSV/Parquet file without a column mapping gets when its header names no format's fields.
MISSING_FIELD_CODES = frozenset({"MISSING_MESSAGES", "MISSING_FIELD"})


@dataclass(frozen=True)
class Problem:
    """One issue, from a ValidationIssue or from a DATASET_INVALID field violation."""

    line: int
    code: str
    message: str
    field: str = ""
    warning: bool = False

    def where(self) -> str:
        place = f"line {self.line}" if self.line > 0 else "file"
        return f"{place} ({self.field})" if self.field else place


def from_issues(issues: Iterable[dataset_pb2.ValidationIssue]) -> list[Problem]:
    return [Problem(i.line, i.code, i.message, i.field, i.severity == dataset_pb2.ISSUE_SEVERITY_WARNING)
            for i in issues]


_LOCATION = re.compile(r"^line (\d+)(?:: (.*))?$")


def from_violations(violations: Iterable[object]) -> list[Problem]:
    """The issues a DATASET_INVALID error lists: field "line 7: messages[2].role" (or "file"),
    description "CODE: sentence" (or the code alone when the sentence did not fit)."""
    out = []
    for v in violations:
        field, description = str(getattr(v, "field", "")), str(getattr(v, "description", ""))
        match = _LOCATION.match(field)
        line, where = (int(match.group(1)), match.group(2) or "") if match else (0, field.partition(": ")[2])
        code, _, message = description.partition(": ")
        out.append(Problem(line, code.strip(), message.strip(), where))
    return out


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _lines(problems: Sequence[Problem]) -> str:
    shown = ", ".join(str(p.line) for p in problems[:EXAMPLES_SHOWN])
    return ("line " if len(problems) == 1 else "lines ") + shown + (", …" if len(problems) > EXAMPLES_SHOWN
                                                                   else "")


_FIELD = re.compile(r"\bmetadata\.[a-z_.]+[a-z]")


def as_options(text: str) -> str:
    """`text` with each metadata field it names written as the option that sets it."""
    return _FIELD.sub(lambda m: option_of(m.group(0)), text)


_IMPORT_FIELD = re.compile(r"\b(?:source|credentials|options)\.[a-z_.]*[a-z]")


def import_as_options(text: str) -> str:
    """`text` with each CreateDatasetRequest field it names written as the option of `datasets import`
    that sets it ("check source.endpoint_url" -> "check --endpoint-url")."""
    return _IMPORT_FIELD.sub(lambda m: import_option_of(m.group(0)), text)


def summary_lines(problems: Sequence[Problem], *, examples_checked: int = 0, error_count: int | None = None,
                  truncated: bool = False, path: Path | None = None,
                  column_mapping: dict[str, str] | None = None) -> list[str]:
    """Plain sentences (no markup), the cause first. `error_count` is every error the file has (the
    report's count), of which `problems` may list only the first; `path` is the local file, read for
    what the report cannot say (its encoding, a CSV's header)."""
    out: list[str] = []
    errors = [p for p in problems if not p.warning]
    total = error_count if error_count is not None else len(errors)
    cause = encoding_problem(path) if path is not None and path.is_file() else None
    if cause:
        out.append(cause)
    file_level = [p for p in errors if p.line <= 0 and p.code not in CONSEQUENCES]
    for p in file_level:
        if cause and p.code == "INVALID_UTF8":
            continue  # said above, with the encoding it is
        out.append(f"{p.code}: {p.message}" + (f" ({p.field})" if p.field else ""))
    by_code: dict[str, list[Problem]] = {}
    for p in errors:
        if p.line > 0 and not (cause and p.code == "INVALID_UTF8"):  # said above, with the encoding
            by_code.setdefault(p.code, []).append(p)
    listed = sum(len(v) for v in by_code.values())
    for code, group in sorted(by_code.items(), key=lambda kv: -len(kv[1])):
        first = next((p for p in group if p.message), group[0])  # a violation may carry its code alone
        if len(by_code) == 1 and not file_level and total and total == examples_checked and not truncated:
            head = f"every example fails the same way ({total} of {examples_checked}): {code}"
        elif len(by_code) == 1 and truncated and total == examples_checked:
            head = (f"every example has an error ({total} of {examples_checked}); the {listed} listed "
                    f"are all {code}")
        elif len(by_code) == 1 and truncated:
            head = f"{total} errors, the {listed} listed all {code}"
        else:
            head = f"{_plural(len(group), 'line')}{' listed' if truncated else ''}: {code}"
        out.append(f"{head}: {first.message}" if first.message else head)
        distinct = [p for p in group if p.message and (p.message, p.field) != (first.message, first.field)]
        if distinct:  # the same code with other details: a few of them, as they are
            out.extend(f"  {p.where()}: {p.message}" for p in group[:EXAMPLES_SHOWN])
            if len(group) > EXAMPLES_SHOWN:
                out.append(f"  … and {len(group) - EXAMPLES_SHOWN} more")
        else:
            out.append(f"  e.g. {_lines(group)}")
    if (path is not None and not column_mapping and by_code.keys() & MISSING_FIELD_CODES
            and path.suffix.lower() in (".csv", ".tsv")):
        header = csv_header(path)
        if header:
            out.append(f"the file's columns are {', '.join(header)}: name the fields they hold with "
                       f"--column-mapping COLUMN=FIELD, e.g. --column-mapping {header[0]}=prompt"
                       + (f",{header[1]}=completion" if len(header) > 1 else ""))
    for p in errors:
        if p.code in CONSEQUENCES:
            out.append(f"{p.code}: {p.message}" if not (cause or file_level or by_code) else
                       f"so: {p.message}")
    return [as_options(line) for line in out]


def report_lines(report: dataset_pb2.ValidationReport, *, path: Path | None = None,
                 column_mapping: dict[str, str] | None = None) -> list[str]:
    """A whole validation report: the verdict, the statistics, the errors (cause first), the warnings."""
    fmt = dataset_pb2.DatasetFormat.Name(report.format).removeprefix("DATASET_FORMAT_")
    stats = report.statistics
    problems = from_issues(report.issues)
    if report.valid:
        out = [f"valid: {stats.example_count} examples, format {fmt}, "
               f"{_plural(report.warning_count, 'warning')}"]
    else:
        out = [f"invalid: {_plural(report.error_count, 'error')}, {_plural(report.warning_count, 'warning')} "
               f"in {report.examples_checked} examples checked (format {fmt})"]
        out += summary_lines(problems, examples_checked=report.examples_checked,
                             error_count=report.error_count, truncated=report.issues_truncated, path=path,
                             column_mapping=column_mapping)
    if report.valid and stats.duplicate_count:
        out.append(f"duplicates: {stats.duplicate_count}")
    if stats.dropped_by_max_samples:
        out.append(f"left out by --max-samples: {stats.dropped_by_max_samples}")
    if stats.HasField("tokens") and stats.tokens.tokenizer:
        t = stats.tokens
        out.append(f"tokens ({t.tokenizer}): total {t.total:,}, median {t.median}, p95 {t.p95}, max {t.max}; "
                   f"{t.truncated_count} over --max-length {t.max_length}")
    warnings = [p for p in problems if p.warning]
    by_code: dict[str, list[Problem]] = {}
    for p in warnings:
        by_code.setdefault(p.code, []).append(p)
    for code, group in by_code.items():
        out.append(f"warning {code} ({_plural(len(group), 'line')}): {group[0].message}")
    if report.issues_truncated:
        out.append(f"(the first {len(report.issues)} issues are listed; --issue-limit lists up to 1000)")
    return out
