"""Reading an uploaded file, whatever its container: JSONL, CSV, Parquet, or a ZIP of images + train.jsonl.

The container is found from the bytes, never from the file name: ZIP and Parquet by their magic
numbers, JSONL when one of the first non-blank lines starts with "{", CSV otherwise (and, with a column
mapping, whenever no line starts with "{": a one-column CSV need not name a known field). A column mapping
renames CSV and Parquet columns and JSONL keys alike. Every reader yields `(line, object)` pairs and
reports what it cannot read through an `IssueSink`, with a 1-based line (the CSV line a record starts on,
the Parquet row number).

ZIP archives are untrusted: entries with `..`, absolute paths, drive letters or backslashes, symbolic
links, encrypted entries, too many entries, and anything that would expand past the extraction limit
or with a compression ratio no real data has (a zip bomb: over MAX_COMPRESSION_RATIO for any entry, or
for the archive as a whole, whatever the size) are refused before a byte is written, and the sizes are
enforced again while extracting (declared sizes can lie). Files are only ever written inside the
caller's work folder. Parquet counts what it decodes against a limit the same way (`parquet_records`).
"""

from __future__ import annotations

import csv
import io
import stat
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from itertools import chain, islice
from pathlib import Path, PurePosixPath
from typing import Any

import msgspec

from services.datasets.issues import IssueCode

BOM = b"\xef\xbb\xbf"
MAX_LINE_BYTES = 16 * 1024 * 1024
DETECTION_SAMPLE_LINES = 100
MASTER_FILE = "train.jsonl"
MAX_ARCHIVE_ENTRIES = 10_000
MAX_COMPRESSION_RATIO = 100
PARQUET_BATCH_ROWS = 4096
IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM")

# Fields whose CSV cells (and Parquet strings) hold JSON lists or objects.
STRUCTURED_FIELDS = frozenset(
    {
        "messages",
        "conversations",
        "chosen",
        "rejected",
        "prompt",
        "input",
        "preferred_output",
        "non_preferred_output",
        "images",
        "tools",
    }
)

# A one-column CSV is recognized by a header naming one of these fields.
FIELD_NAMES = frozenset({"messages", "conversations", "text", "prompt"})

IssueSink = Callable[..., None]
"""`add(code, message, line=0, field="")` records one problem of the file."""

# Yielded instead of an object for a record that could not be read (already reported): it still counts
# as an example checked.
UNREADABLE: Any = object()


# Byte-order marks of the encodings a text file is saved in instead of UTF-8; UTF-32 LE before UTF-16 LE,
# which it starts like.
_WIDE_BOMS = (
    (b"\xff\xfe\x00\x00", "UTF-32", "little-endian, with a byte-order mark"),
    (b"\x00\x00\xfe\xff", "UTF-32", "big-endian, with a byte-order mark"),
    (b"\xff\xfe", "UTF-16", "little-endian, with a byte-order mark"),
    (b"\xfe\xff", "UTF-16", "big-endian, with a byte-order mark"),
)


def wide_encoding(head: bytes) -> tuple[str, str] | None:
    """(encoding, byte order) when a file's first bytes are UTF-16 or UTF-32 text rather than UTF-8: a
    byte-order mark, or (UTF-16 without one) a NUL in nearly every other byte; None otherwise. ZIP and
    Parquet files are binary by design and never named here. Such a file would otherwise read as one
    line of invalid UTF-8 and "0 examples", which hides the cause."""
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06", b"PAR1")):
        return None
    for bom, encoding, order in _WIDE_BOMS:
        if head.startswith(bom):
            return encoding, order
    sample = head[:1024]
    if len(sample) >= 8:
        even, odd = sample[0::2], sample[1::2]
        if odd.count(0) > 0.9 * len(odd) and even.count(0) < 0.1 * len(even):
            return "UTF-16", "little-endian, no byte-order mark"
        if even.count(0) > 0.9 * len(even) and odd.count(0) < 0.1 * len(odd):
            return "UTF-16", "big-endian, no byte-order mark"
    return None


# Containers a dataset file may not come in, by their first bytes (a tar archive's "ustar" is at 257).
_UNSUPPORTED_MAGIC = (
    (b"\x1f\x8b", "gzip-compressed", "gunzip it"),
    (b"BZh", "bzip2-compressed", "bunzip2 it"),
    (b"\xfd7zXZ\x00", "xz-compressed", "unxz it"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed", "unzstd it"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive", "extract it"),
    (b"Rar!\x1a\x07", "a RAR archive", "extract it"),
)


def unsupported_container(head: bytes) -> str | None:
    """What a file is when its first bytes say it is compressed or archived in a form the platform does
    not read (gzip, bzip2, xz, zstd, 7-Zip, RAR, tar), with what to do instead; None otherwise. Such a file
    would otherwise read as invalid UTF-8 on line 1, which hides the cause."""
    for magic, what, undo in _UNSUPPORTED_MAGIC:
        if head.startswith(magic):
            return f"The file is {what}; {undo} and upload the file itself, or upload a ZIP archive."
    if head[257:262] == b"ustar":
        return "The file is a tar archive; extract it and upload the file itself, or upload a ZIP archive."
    return None


class SourceKind(StrEnum):
    JSONL = "jsonl"
    CSV = "csv"
    PARQUET = "parquet"
    ZIP = "zip"


def sniff(path: Path, *, has_mapping: bool = False) -> SourceKind:
    """The container of a file, from its first bytes (and its last four, for Parquet)."""
    with path.open("rb") as f:
        head = f.read(64 * 1024)
        if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
            return SourceKind.ZIP
        if head.startswith(b"PAR1"):
            f.seek(-4, io.SEEK_END)
            if f.read(4) == b"PAR1":
                return SourceKind.PARQUET
    lines = [line.strip() for line in head.removeprefix(BOM).splitlines() if line.strip()]
    if not lines or any(line.startswith(b"{") for line in lines[:DETECTION_SAMPLE_LINES]):
        return SourceKind.JSONL
    if has_mapping:
        return SourceKind.CSV
    first = lines[0]
    single_column = first.decode("utf-8", "replace") in FIELD_NAMES
    return SourceKind.CSV if b"," in first or b"\t" in first or single_column else SourceKind.JSONL


# -- JSONL ---------------------------------------------------------------------------------------------


BLOCK_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class LineBlock:
    """Consecutive whole lines of a JSONL file, the first numbered `start`: each had a line end, which
    is removed (trailing carriage returns too); blank lines are kept, so line k is `start + k`."""

    start: int
    lines: list[bytes]


def jsonl_chunks(
    path: Path, max_line_bytes: int, add: IssueSink
) -> Iterator[LineBlock | tuple[int, bytes | None, bool]]:
    """The lines of a JSONL file as LineBlocks (read a block at a time and split in C), or, for what needs
    a closer look (the first line's BOM, a line over `max_line_bytes`, a last line without a line end, a
    line longer than a block), one `(number, line or None, unterminated)` item as `jsonl_lines` gives."""
    with path.open("rb") as f:
        number = pos = 0
        while True:
            f.seek(pos)
            block = f.read(BLOCK_BYTES)
            if not block:
                return
            end = block.rfind(b"\n")
            if end >= 0 and not (pos == 0 and block.startswith(BOM)):
                lines = block[:end].split(b"\n")
                whole = len(lines)
                if end > max_line_bytes and max(lengths := list(map(len, lines))) > max_line_bytes:
                    # The lines before the long one are read here, the long one on its own below.
                    whole = next(k for k, n in enumerate(lengths) if n > max_line_bytes)
                    lines = lines[:whole]
                    end = sum(lengths[:whole]) + whole - 1
                if lines:
                    if b"\r" in block:
                        lines = [line.rstrip(b"\r") for line in lines]
                    yield LineBlock(number + 1, lines)
                    number += whole
                    pos += end + 1
                    continue
            f.seek(pos)
            step = _one_line(f, number, max_line_bytes, add)
            if step is None:
                return
            number, item = step
            pos = f.tell()
            if item is not None:
                yield item


def _one_line(
    f: Any, number: int, max_line_bytes: int, add: IssueSink
) -> tuple[int, tuple[int, bytes | None, bool] | None] | None:
    """Reads the line at f's position: (its number, its item or None when blank), or None at the end."""
    raw = f.readline(max_line_bytes + 1)
    if not raw:
        return None
    number += 1
    if number == 1 and raw.startswith(BOM):
        raw = raw[len(BOM) :]
    if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
        size = len(raw)
        while raw and not raw.endswith(b"\n"):
            raw = f.readline(1024 * 1024)
            size += len(raw)
        add(
            IssueCode.LINE_TOO_LONG,
            f"The line is {size} bytes long; lines may be at most {max_line_bytes} "
            "bytes (one example per line).",
            number,
        )
        return number, (number, None, False)
    unterminated = not raw.endswith(b"\n")
    line = raw.rstrip(b"\r\n")
    return number, ((number, line, unterminated) if line.strip() else None)


def jsonl_lines(path: Path, max_line_bytes: int, add: IssueSink) -> Iterator[tuple[int, bytes | None, bool]]:
    """(line number, raw line without its end, whether it was the last line and had no line end) for
    every non-blank line; a line longer than `max_line_bytes` is reported and yielded as None, without
    ever being in memory whole."""
    for chunk in jsonl_chunks(path, max_line_bytes, add):
        if isinstance(chunk, LineBlock):
            for k, line in enumerate(chunk.lines, chunk.start):
                if line.strip():
                    yield k, line, False
        else:
            yield chunk


_decode = msgspec.json.Decoder().decode


def parse_json_line(line: bytes, unterminated: bool, number: int, add: IssueSink) -> Any:
    """The JSON value of one line, or UNREADABLE after reporting why it has none.

    msgspec parses the common case fast; anything it refuses is parsed again by the standard library,
    which accepts a little more (NaN) and says precisely what is wrong. What the standard library accepts
    but no UTF-8 output can hold (a lone surrogate escape, "\\ud800") or Python will not convert (an
    integer of over 4300 digits) is an issue on the line too, never an error of the server.
    """
    try:
        return _decode(line)
    except (msgspec.DecodeError, UnicodeDecodeError, ValueError, RecursionError):
        pass
    import json

    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        add(
            IssueCode.INVALID_UTF8,
            f"The line is not valid UTF-8 (byte 0x{line[exc.start]:02x} at position "
            f"{exc.start + 1}); save the file as UTF-8.",
            number,
        )
        return UNREADABLE
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if unterminated:
            add(
                IssueCode.TRUNCATED_LINE,
                f"The last line is not complete JSON ({exc.msg} at column {exc.colno}) and "
                "has no line end: the file looks cut short; upload the whole file again.",
                number,
            )
        else:
            add(
                IssueCode.INVALID_JSON,
                f"The line is not valid JSON: {exc.msg} at column {exc.colno}.",
                number,
            )
        return UNREADABLE
    except RecursionError:
        add(IssueCode.INVALID_JSON, "The line nests lists or objects too deeply to be parsed.", number)
        return UNREADABLE
    except ValueError:  # an integer of more digits than Python converts (4300)
        add(
            IssueCode.INVALID_JSON,
            "The line holds a number with too many digits to be read; write numbers of at most 4300 "
            "digits (or as strings).",
            number,
        )
        return UNREADABLE
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        add(
            IssueCode.INVALID_JSON,
            "The line holds a \\u escape of a lone UTF-16 surrogate (\\ud800-\\udfff without its pair), "
            "which is no character; escape characters outside the BMP as a surrogate pair, or write them "
            "as UTF-8.",
            number,
        )
        return UNREADABLE
    except RecursionError:
        add(IssueCode.INVALID_JSON, "The line nests lists or objects too deeply to be parsed.", number)
        return UNREADABLE
    return value


# -- CSV and Parquet -----------------------------------------------------------------------------------


def _cell(field: str, value: Any) -> Any:
    """A CSV/Parquet value as the format expects it: JSON text of structured fields parsed, labels as
    booleans."""
    if isinstance(value, str):
        text = value.strip()
        if field in STRUCTURED_FIELDS and text[:1] in ("[", "{"):
            try:
                return _decode(text.encode())
            except (msgspec.DecodeError, ValueError, RecursionError):
                return value  # the format check reports the wrong type
        if field == "label" and text.lower() in ("true", "false"):
            return text.lower() == "true"
    return value


def _columns(header: list[str], mapping: dict[str, str], line: int, add: IssueSink) -> list[str] | None:
    """The field name of each column: mapped columns renamed, the others kept."""
    missing = [f"{field} <- {column}" for field, column in mapping.items() if column not in header]
    if missing:
        add(
            IssueCode.MISSING_COLUMN,
            f"The column mapping names columns the file does not have ({', '.join(missing)}); "
            f"its columns are: {', '.join(header)}.",
            line,
            "column_mapping",
        )
        return None
    renamed = {column: field for field, column in mapping.items()}
    return [renamed.get(column, column) for column in header]


def mapped_objects(
    records: Iterator[tuple[int, Any]], mapping: dict[str, str], add: IssueSink, sample: int
) -> Iterator[tuple[int, Any]]:
    """JSONL objects with the mapped keys renamed (`{field: key}` like a CSV column mapping). A mapped key
    that none of the first `sample` objects has is reported once, as a CSV's missing column is, and
    nothing is read."""
    renamed = {key: field for field, key in mapping.items()}
    head = list(islice(records, sample))
    seen = {key for _, obj in head if isinstance(obj, dict) for key in obj}
    missing = [f"{field} <- {key}" for field, key in mapping.items() if key not in seen]
    if missing and any(isinstance(obj, dict) for _, obj in head):
        add(
            IssueCode.MISSING_COLUMN,
            f"The column mapping names keys no line has ({', '.join(missing)}); the lines' keys are: "
            f"{', '.join(sorted(seen))}.",
            head[0][0],
            "column_mapping",
        )
        return
    for number, obj in chain(head, records):
        if isinstance(obj, dict):
            obj = {renamed.get(key, key): value for key, value in obj.items()}
        yield number, obj


def _row(fields: list[str], values: list[Any]) -> dict[str, Any]:
    return {f: _cell(f, v) for f, v in zip(fields, values, strict=True) if v is not None}


def csv_records(
    path: Path, mapping: dict[str, str], max_line_bytes: int, add: IssueSink
) -> Iterator[tuple[int, Any]]:
    csv.field_size_limit(max_line_bytes)
    with path.open("r", encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        start = 1
        fields: list[str] | None = None
        try:
            for values in reader:
                line, start = start, reader.line_num + 1
                if not any(v.strip() for v in values):
                    continue
                if fields is None:
                    fields = _columns([v.strip() for v in values], mapping, line, add)
                    if fields is None:
                        return
                    continue
                if len(values) != len(fields):
                    add(
                        IssueCode.CSV_COLUMN_COUNT,
                        f"The record has {len(values)} columns; the header has {len(fields)}.",
                        line,
                    )
                    yield line, UNREADABLE
                    continue
                yield line, _row(fields, values)
        except UnicodeDecodeError as exc:
            add(
                IssueCode.INVALID_UTF8,
                f"The file is not valid UTF-8 (byte 0x{exc.object[exc.start]:02x}) after line "
                f"{start - 1}; save it as UTF-8.",
                start,
            )
        except csv.Error as exc:
            add(IssueCode.INVALID_CSV, f"The CSV cannot be read: {exc}.", start)


def decoded_too_large(add: IssueSink, limit: int, what: str, line: int = 0) -> None:
    """Reports a file whose content decodes to more than `limit` bytes (the upload limit, or the
    extraction limit for a ZIP)."""
    add(
        IssueCode.DECODED_TOO_LARGE,
        f"The file decodes to more than {limit} bytes ({what}), the most a file may expand to "
        "(TUNEFORGE_MAX_UPLOAD_BYTES; TUNEFORGE_MAX_EXTRACTED_BYTES for a ZIP); the rest was not read. "
        "Split it into smaller files.",
        line,
    )


def parquet_records(
    path: Path, mapping: dict[str, str], add: IssueSink, max_bytes: int = 2**31
) -> Iterator[tuple[int, Any]]:
    """Rows in batches of PARQUET_BATCH_ROWS, so a large file is never in memory whole; line = row + 1.

    Parquet compresses and dictionary-encodes, so a few kilobytes can decode to gigabytes: the sizes the
    file declares for its decompressed column chunks, and then the bytes each batch actually decodes to,
    count against `max_bytes` from the first byte, and reading stops at the limit.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        meta = parquet.metadata
        declared = sum(
            meta.row_group(g).column(c).total_uncompressed_size
            for g in range(meta.num_row_groups)
            for c in range(meta.num_columns)
        )
        if declared > max_bytes:
            decoded_too_large(add, max_bytes, f"its column chunks declare {declared} bytes uncompressed")
            return
        fields = _columns(list(parquet.schema_arrow.names), mapping, 0, add)
        if fields is None:
            return
        row = decoded = 0
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS):
            decoded += batch.nbytes
            if decoded > max_bytes:
                decoded_too_large(add, max_bytes, f"rows up to {row + batch.num_rows}", row + 1)
                return
            columns = [batch.column(i).to_pylist() for i in range(batch.num_columns)]
            for values in zip(*columns, strict=True):
                row += 1
                yield row, _row(fields, list(values))
    except (pa.ArrowException, OSError, ValueError) as exc:  # ValueError: e.g. a string that is not UTF-8
        add(IssueCode.INVALID_PARQUET, f"The Parquet file cannot be read: {exc}.", 0)


# -- ZIP -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Archive:
    """An extracted ZIP: its master file, and the folder image paths are relative to."""

    master: Path
    root: Path


def _unsafe(info: zipfile.ZipInfo) -> str | None:
    name = info.filename
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "is a symbolic link"
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "has an absolute path"
    if "\\" in name or ".." in PurePosixPath(name).parts or "\x00" in name:
        return "points outside the archive"
    if info.flag_bits & 0x1:
        return "is encrypted"
    return None


def extract_zip(path: Path, dest: Path, max_bytes: int, add: IssueSink) -> Archive | None:
    """Extracts a vision-language ZIP into `dest` after checking every entry; None after reporting why
    it cannot be used."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            if len(infos) > MAX_ARCHIVE_ENTRIES:
                add(
                    IssueCode.ARCHIVE_TOO_LARGE,
                    f"The archive has {len(infos)} entries; at most {MAX_ARCHIVE_ENTRIES} are accepted.",
                    0,
                )
                return None
            bad = [(i.filename, why) for i in infos if (why := _unsafe(i))]
            for name, why in bad:
                add(
                    IssueCode.UNSAFE_ARCHIVE_ENTRY,
                    f"The entry {name!r} {why}; archives may only hold plain files with relative paths.",
                    0,
                    name,
                )
            if bad:
                return None
            total = sum(i.file_size for i in infos)
            # The ratio holds from the first byte: per entry (declared sizes), and for the whole archive
            # against its real size (a declared compressed size may lie).
            ratio = MAX_COMPRESSION_RATIO
            bomb = [i.filename for i in infos if i.file_size > ratio * max(i.compress_size, 1)]
            archive_bytes = path.stat().st_size
            if not bomb and total > ratio * max(archive_bytes, 1):
                bomb = [""]
            if total > max_bytes or bomb:
                if total > max_bytes:
                    what = f"its entries expand to {total} bytes, over the limit of {max_bytes}"
                elif bomb[0]:
                    what = f"entry {bomb[0]!r} expands more than {MAX_COMPRESSION_RATIO}x"
                else:
                    what = (f"its {archive_bytes} bytes expand to {total}, more than "
                            f"{MAX_COMPRESSION_RATIO}x")
                add(
                    IssueCode.ARCHIVE_TOO_LARGE,
                    f"The archive looks like a zip bomb: {what}.",
                    0,
                    bomb[0] if bomb else "",
                )
                return None
            files = {i.filename: i for i in infos if not i.is_dir()}
            master = _master(files)
            if master is None:
                add(
                    IssueCode.MISSING_MASTER_FILE,
                    f"The archive has no {MASTER_FILE} at its top (or in its one top "
                    "folder); put the training examples there and the images beside them.",
                    0,
                    MASTER_FILE,
                )
                return None
            written = 0
            for name, info in files.items():
                target = dest.joinpath(*PurePosixPath(name).parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as src, target.open("wb") as out:
                    while chunk := src.read(1024 * 1024):
                        written += len(chunk)
                        if written > max_bytes or written > total:
                            add(
                                IssueCode.ARCHIVE_TOO_LARGE,
                                "The archive expands to more bytes than its entries "
                                "declare: it looks like a zip bomb.",
                                0,
                                name,
                            )
                            return None
                        out.write(chunk)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, OSError) as exc:
        add(IssueCode.INVALID_ARCHIVE, f"The ZIP archive cannot be read: {exc}.", 0)
        return None
    master_path = dest.joinpath(*PurePosixPath(master).parts)
    return Archive(master_path, master_path.parent)


def _master(files: dict[str, zipfile.ZipInfo]) -> str | None:
    if MASTER_FILE in files:
        return MASTER_FILE
    tops = {PurePosixPath(n).parts[0] for n in files}
    if len(tops) == 1:
        candidate = f"{tops.pop()}/{MASTER_FILE}"
        if candidate in files:
            return candidate
    return None


def image_problem(root: Path, relative: str) -> tuple[IssueCode, str] | None:
    """(code, sentence) when `relative` is not an image file inside `root`, else None."""
    parts = PurePosixPath(relative).parts
    if relative.startswith("/") or ".." in parts or "\\" in relative:
        return (
            IssueCode.MISSING_IMAGE,
            f"Image path {relative!r} must be relative to {MASTER_FILE}, inside the archive.",
        )
    path = root.joinpath(*parts)
    if not path.is_file():
        return (
            IssueCode.MISSING_IMAGE,
            f"Image {relative!r} is not in the archive (paths are relative to {MASTER_FILE}).",
        )
    with path.open("rb") as f:
        head = f.read(16)
    if not (head.startswith(IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")):
        return IssueCode.INVALID_IMAGE, f"{relative!r} is not a PNG, JPEG, GIF, WebP or BMP image."
    return None
