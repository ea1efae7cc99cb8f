"""A corpus of bad datasets, generated in code: each with the error code and location it must get.

Every file is small (a few good lines around one defect) so the whole corpus goes through the real
service in seconds. `location` is the BadRequest field the first violation with that code must name.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import stat
import tarfile
import zipfile
from dataclasses import dataclass, field

from tests.datasets.helpers import MAX_LINE_BYTES

MIN_EXAMPLES = 3
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32

U = {"role": "user", "content": "What is 2 + 2?"}
A = {"role": "assistant", "content": "4."}


def good(i: int) -> str:
    return json.dumps(
        {
            "messages": [
                {"role": "user", "content": f"What is {i} + 1?"},
                {"role": "assistant", "content": f"{i + 1}."},
            ]
        }
    )


def around(bad: str | bytes, *, before: int = 2, after: int = 2) -> bytes:
    """`bad` as line before+1 of a file of good chat lines."""
    lines = [good(i).encode() for i in range(before)]
    lines.append(bad if isinstance(bad, bytes) else bad.encode())
    lines += [good(i).encode() for i in range(before, before + after)]
    return b"\n".join(lines) + b"\n"


def msgs(*messages: object) -> str:
    return json.dumps({"messages": list(messages)})


def zip_bytes(entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for info, data in entries:
            archive.writestr(info, data)
    return buffer.getvalue()


def symlink(name: str, target: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target.encode()


def vision_row(*images: str) -> str:
    parts = [{"type": "image"} for _ in images] + [{"type": "text", "text": "What is shown?"}]
    return json.dumps({"messages": [{"role": "user", "content": parts}, A], "images": list(images)})


def vision_zip(rows: list[str], files: dict[str, bytes]) -> bytes:
    return zip_bytes([("train.jsonl", ("\n".join(rows) + "\n").encode()), *files.items()])


@dataclass(frozen=True)
class Bad:
    name: str
    data: bytes
    code: str
    location: str
    metadata: dict[str, object] = field(default_factory=dict)


def _tar_of(data: bytes) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        info = tarfile.TarInfo("train.jsonl")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _parquet_garbage() -> bytes:
    return b"PAR1" + b"\x00garbage" * 20 + b"PAR1"


def _deep() -> str:
    return "[" * 20_000 + "]" * 20_000


def _bomb() -> bytes:
    return zip_bytes([("train.jsonl", (good(0) + "\n").encode()), ("zeros.bin", b"\x00" * (3 * 1024 * 1024))])


def _mib_entries() -> bytes:
    """Entries of exactly 1 MiB: the ratio check used to start above 1 MiB, so 1024 of them expanded a
    1 MiB archive to 1 GiB."""
    pad = b"\x00" * (1024 * 1024)
    return zip_bytes([("train.jsonl", (good(0) + "\n").encode()), ("pad-0.bin", pad), ("pad-1.bin", pad)])


def _parquet_expanding() -> bytes:
    """A few KB of Parquet (one dictionary value, compressed) that decodes to over the tests' upload limit
    (256 KiB): a 23 KB file once became 387 MiB of stored examples."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = 400
    buffer = io.BytesIO()
    pq.write_table(pa.table({"prompt": ["p" * 2000] * rows, "completion": [f"c{i}" for i in range(rows)]}),
                   buffer, compression="zstd")
    return buffer.getvalue()


# Past the first 100 lines (format detection) plain chat lines take the fast path, which meets a defect
# with other code than the first 100 lines do.
FAST = 110


CSV_MAPPING = {"column_mapping": {"columns": {"prompt": "question", "completion": "answer"}}}

CORPUS: list[Bad] = [
    Bad(
        "non-utf8",
        around(b'{"messages": [{"role": "user", "content": "caf\xe9"}]}'),
        "INVALID_UTF8",
        "line 3",
    ),
    Bad("empty file", b"", "EMPTY_FILE", "file"),
    Bad(
        "truncated last line",
        around("", after=0).rstrip(b"\n") + b'\n{"messages": [{"role": "us',
        "TRUNCATED_LINE",
        "line 3",
    ),
    Bad(
        "huge single line",
        around(msgs(U, {"role": "assistant", "content": "x" * (MAX_LINE_BYTES + 10)})),
        "LINE_TOO_LONG",
        "line 3",
    ),
    Bad("invalid json", around('{"messages": [}'), "INVALID_JSON", "line 3"),
    Bad("nested too deep", around(_deep()), "INVALID_JSON", "line 3"),
    Bad("array line", around("[1, 2]"), "NOT_AN_OBJECT", "line 3"),
    Bad("no messages", around('{"question": "q", "answer": "a"}'), "MISSING_MESSAGES", "line 3: messages"),
    Bad("messages not a list", around('{"messages": "hi"}'), "MESSAGES_NOT_A_LIST", "line 3: messages"),
    Bad("empty messages", around('{"messages": []}'), "EMPTY_MESSAGES", "line 3: messages"),
    Bad("message not an object", around(msgs(U, "hi")), "MESSAGE_NOT_AN_OBJECT", "line 3: messages[1]"),
    Bad("missing role", around(msgs({"content": "x"}, A)), "MISSING_ROLE", "line 3: messages[0].role"),
    Bad(
        "unknown role",
        around(msgs(U, {"role": "bot", "content": "x"})),
        "INVALID_ROLE",
        "line 3: messages[1].role",
    ),
    Bad(
        "missing content", around(msgs({"role": "user"}, A)), "MISSING_CONTENT", "line 3: messages[0].content"
    ),
    Bad(
        "content a number",
        around(msgs(U, {"role": "assistant", "content": 4})),
        "CONTENT_NOT_A_STRING",
        "line 3: messages[1].content",
    ),
    Bad(
        "empty content",
        around(msgs(U, {"role": "assistant", "content": " "})),
        "EMPTY_CONTENT",
        "line 3: messages[1].content",
    ),
    Bad(
        "weight not 0 or 1",
        around(msgs(U, {**A, "weight": 0.5})),
        "INVALID_WEIGHT",
        "line 3: messages[1].weight",
    ),
    Bad("no assistant turn", around(msgs(U)), "MISSING_ASSISTANT_TURN", "line 3: messages"),
    Bad("roles do not alternate", around(msgs(U, U, A)), "ROLES_NOT_ALTERNATING", "line 3: messages[1].role"),
    Bad(
        "system not first",
        around(msgs(U, {"role": "system", "content": "s"}, A)),
        "SYSTEM_NOT_FIRST",
        "line 3: messages[1].role",
    ),
    Bad(
        "tool without call",
        around(msgs(U, {"role": "tool", "content": "r"}, A)),
        "TOOL_WITHOUT_CALL",
        "line 3: messages[1].role",
    ),
    Bad(
        "tool call arguments not json",
        around(
            msgs(
                U,
                {
                    "role": "assistant",
                    "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{x"}}],
                },
            )
        ),
        "INVALID_TOOL_CALL",
        "line 3: messages[1].tool_calls[0].function.arguments",
    ),
    Bad("mixed formats", around('{"instruction": "q", "output": "a"}'), "FORMAT_MISMATCH", "line 3"),
    Bad("too few examples", (good(0) + "\n").encode(), "TOO_FEW_EXAMPLES", "file"),
    Bad("images without a zip", around(vision_row("cat.png")), "MISSING_IMAGE", "line 3: images[0]"),
    Bad(
        "sharegpt bad speaker",
        b"".join(
            json.dumps(
                {
                    "conversations": [
                        {"from": "human", "value": "q"},
                        {"from": "robot" if i == 2 else "gpt", "value": "a"},
                    ]
                }
            ).encode()
            + b"\n"
            for i in range(4)
        ),
        "INVALID_ROLE",
        "line 3: conversations[1].from",
    ),
    Bad(
        "alpaca missing output",
        b"".join(
            json.dumps({"instruction": f"q{i}", **({} if i == 1 else {"output": "a"})}).encode() + b"\n"
            for i in range(4)
        ),
        "MISSING_FIELD",
        "line 2: output",
    ),
    Bad(
        "kto label not a boolean",
        b"".join(
            json.dumps({"prompt": "p", "completion": f"c{i}", "label": "yes" if i == 3 else True}).encode()
            + b"\n"
            for i in range(4)
        ),
        "INVALID_LABEL",
        "line 4: label",
    ),
    Bad(
        "preference mixes strings and lists",
        b"".join(
            json.dumps({"prompt": "p", "chosen": f"a{i}", "rejected": [A] if i == 0 else "b"}).encode()
            + b"\n"
            for i in range(4)
        ),
        "MIXED_SHAPES",
        "line 1: prompt",
    ),
    Bad(
        "csv wrong column count",
        b"question,answer\nq1,a1\nq2\nq3,a3\nq4,a4\n",
        "CSV_COLUMN_COUNT",
        "line 3",
        CSV_MAPPING,
    ),
    Bad(
        "csv mapping names a missing column",
        b"q,a\nq1,a1\nq2,a2\nq3,a3\n",
        "MISSING_COLUMN",
        "line 1: column_mapping",
        CSV_MAPPING,
    ),
    Bad("corrupt parquet", _parquet_garbage(), "INVALID_PARQUET", "file"),
    Bad(
        "zip slip",
        zip_bytes([("train.jsonl", b"{}\n"), ("../evil.txt", b"pwned")]),
        "UNSAFE_ARCHIVE_ENTRY",
        "file: ../evil.txt",
    ),
    Bad(
        "zip absolute path",
        zip_bytes([("train.jsonl", b"{}\n"), ("/tmp/tf-evil.txt", b"pwned")]),
        "UNSAFE_ARCHIVE_ENTRY",
        "file: /tmp/tf-evil.txt",
    ),
    Bad(
        "zip symlink",
        zip_bytes([("train.jsonl", b"{}\n"), symlink("link.png", "/etc/passwd")]),
        "UNSAFE_ARCHIVE_ENTRY",
        "file: link.png",
    ),
    Bad("zip bomb", _bomb(), "ARCHIVE_TOO_LARGE", "file: zeros.bin"),
    Bad(
        "zip without train.jsonl",
        zip_bytes([("data.jsonl", b"{}\n")]),
        "MISSING_MASTER_FILE",
        "file: train.jsonl",
    ),
    Bad(
        "zip missing image",
        vision_zip([vision_row("a.png"), vision_row("b.png"), vision_row("a.png")], {"a.png": PNG}),
        "MISSING_IMAGE",
        "line 2: images[0]",
    ),
    Bad(
        "zip image not an image",
        vision_zip(
            [vision_row("a.png")] * 2 + [vision_row("b.png")], {"a.png": PNG, "b.png": b"not an image"}
        ),
        "INVALID_IMAGE",
        "line 3: images[0]",
    ),
    Bad(
        "zip image count mismatch",
        vision_zip(
            [vision_row("a.png")] * 2 + [json.dumps({"messages": [U, A], "images": ["a.png"]})],
            {"a.png": PNG},
        ),
        "INVALID_CONTENT_PART",
        "line 3: images",
    ),
    Bad("corrupt zip", b"PK\x03\x04" + b"\x00" * 200, "INVALID_ARCHIVE", "file"),
    # A compressed file is named for what it is, not "invalid UTF-8 (byte 0x8b)" on line 1.
    Bad("gzip file", gzip.compress(msgs(U, A).encode() * 20), "UNSUPPORTED_CONTAINER", "file"),
    Bad("bzip2 file", bz2.compress(msgs(U, A).encode() * 20), "UNSUPPORTED_CONTAINER", "file"),
    Bad("xz file", lzma.compress(msgs(U, A).encode() * 20), "UNSUPPORTED_CONTAINER", "file"),
    Bad("tar file", _tar_of(msgs(U, A).encode() * 20), "UNSUPPORTED_CONTAINER", "file"),
    # Hostile input: each of these once made the service answer INTERNAL or expand without bound.
    Bad(
        "non-utf8 on the fast path",
        around(msgs(U, {"role": "assistant", "content": "cafe"}).encode().replace(b"cafe", b"caf\xe9"),
               before=FAST),
        "INVALID_UTF8",
        f"line {FAST + 1}",
    ),
    Bad("lone surrogate escape", around(msgs(U, {"role": "assistant", "content": "\ud800"})), "INVALID_JSON",
        "line 3"),
    Bad(
        "lone surrogate escape on the fast path",
        around(msgs(U, {"role": "assistant", "content": "\udfff"}), before=FAST),
        "INVALID_JSON",
        f"line {FAST + 1}",
    ),
    Bad("5000-digit integer", around('{"messages": [], "n": ' + "9" * 5000 + "}"), "INVALID_JSON", "line 3"),
    Bad("zip of 1 MiB entries", _mib_entries(), "ARCHIVE_TOO_LARGE", "file: pad-0.bin"),
    Bad(
        "small zip entry over the ratio",
        zip_bytes([("train.jsonl", (good(0) + "\n").encode()), ("zeros.bin", b"\x00" * (200 * 1024))]),
        "ARCHIVE_TOO_LARGE",
        "file: zeros.bin",
    ),
    Bad("parquet decoding past the limit", _parquet_expanding(), "DECODED_TOO_LARGE", "line 1"),
    Bad(
        "system prompt multiplying the examples past the limit",
        b"".join((good(i) + "\n").encode() for i in range(12)),
        "DECODED_TOO_LARGE",
        "line 9",
        {"options": {"system_prompt": "s" * 30_000}},
    ),
]
