"""Validation throughput of the datasets service, in MB/s per core, on a generated chat JSONL.

    .venv/bin/python benchmarks/bench_validation.py                # 200 MB
    .venv/bin/python benchmarks/bench_validation.py --size-mb 50   # smaller, on a busy machine

Prints, over the same file and each in one process (MB/s of CPU time, all threads counted, is MB/s per
core), the median of --repeat rounds, each round running every measurement once (so a machine whose
load changes during the run slows them alike), and each figure's ratio to the json.loads floor:
  json floor      a plain `json.loads` loop over the lines (what any Python validator pays to parse)
  msgspec floor   msgspec's untyped decoder over the lines (the parser of the slow path)
  structural      validate_source without output: parse, check every format rule, count duplicates and
                  statistics, build the report
  + write         the same, also normalizing each example and writing normalized.jsonl (what an upload
                  does)
  + tokens        + write, then token statistics with the tiny model's tokenizer and chat template
                  (trainer_worker.tiny): the path of an upload with metadata.tokenizer; on a smaller
                  file (--token-mb), since tokenizing is ~40x slower, beside that file's own floor
MB are 10^6 bytes of the input file.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from services.datasets.domain import DatasetFormat
from services.datasets.tokens import load_tokenizer, token_lengths
from services.datasets.validation import validate_source

WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had "
    "by word but not what all were we when your can said there use an each which she do how their if will "
    "up other about out many then them these so some her would make like him into time has look two more "
    "write go see number no way could people my than first water been call who oil its now find long "
    "down day did get come made may part café naïve über 数据 모델"
).split()


def generate(path: Path, megabytes: float, seed: int = 0) -> int:
    """A chat JSONL of about `megabytes` MB: 1-3 turns, an optional system prompt, varied lengths."""
    rng = random.Random(seed)

    def sentence(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."

    target = int(megabytes * 1e6)
    written = lines = 0
    with path.open("w", encoding="utf-8") as f:
        while written < target:
            messages = [{"role": "system", "content": sentence(5, 15)}] if rng.random() < 0.5 else []
            for _ in range(rng.randint(1, 3)):
                messages.append({"role": "user", "content": sentence(5, 40)})
                messages.append({"role": "assistant", "content": sentence(10, 80)})
            line = json.dumps({"messages": messages}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode())
            lines += 1
    return lines


def json_floor(path: Path) -> None:
    with path.open("rb") as f:
        for line in f:
            json.loads(line)


def msgspec_floor(path: Path) -> None:
    decode = msgspec.json.Decoder().decode
    with path.open("rb") as f:
        for line in f:
            decode(line)


def structural(path: Path, work: Path) -> None:
    report = validate_source(path, work_dir=work, format=None, min_examples=1).report
    assert report.valid and report.format is DatasetFormat.OPENAI_CHAT, report.issues[:3]


def with_write(path: Path, work: Path) -> None:
    with (work / "normalized.jsonl").open("wb") as out:
        report = validate_source(path, work_dir=work, format=None, min_examples=1, normalized_out=out).report
    assert report.valid and report.format is DatasetFormat.OPENAI_CHAT, report.issues[:3]


def with_tokens(path: Path, work: Path, tokenizer: object) -> None:
    with_write(path, work)
    token_lengths(work / "normalized.jsonl", DatasetFormat.OPENAI_CHAT, tokenizer)


def measure(
    works: dict[str, Callable[[], object]], repeat: int, tmp_outputs: tuple[Path, ...]
) -> dict[str, float]:
    """Median CPU seconds of each work over `repeat` rounds; a round runs every work once, each after
    removing `tmp_outputs` (untimed)."""
    seconds: dict[str, list[float]] = {name: [] for name in works}
    for _ in range(repeat):
        for name, work in works.items():
            for old in tmp_outputs:  # an upload writes a new file: do not time truncating the last one
                old.unlink(missing_ok=True)
            start = time.process_time()
            work()
            seconds[name].append(time.process_time() - start)
    return {name: statistics.median(times) for name, times in seconds.items()}


def show(label: str, what: str, mb: float, seconds: float, floor: float) -> None:
    rate = mb / seconds
    print(f"{label:14s} {what:36s} {rate:8.1f} MB/s/core  {seconds:6.2f} s CPU  {rate / floor:5.2f}x floor")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--size-mb", "--mb", dest="size_mb", type=float, default=200.0, help="size of the file in MB"
    )
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the median is shown")
    parser.add_argument(
        "--token-mb",
        type=float,
        default=20.0,
        help="size of the file for the token-statistics run (tokenizing is ~40x slower)",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-validation-") as tmp:
        root = Path(tmp)
        data = root / "chat.jsonl"
        lines = generate(data, args.size_mb)
        mb = data.stat().st_size / 1e6
        print(f"file: {mb:.1f} MB, {lines} chat examples, python {sys.version.split()[0]}")
        times = measure(
            {
                "json": lambda: json_floor(data),
                "msgspec": lambda: msgspec_floor(data),
                "structural": lambda: structural(data, root),
                "write": lambda: with_write(data, root),
            },
            args.repeat,
            (root / "normalized.jsonl",),
        )
        floor = mb / times["json"]
        show("json floor", "json.loads loop", mb, times["json"], floor)
        show("msgspec floor", "msgspec decoder loop", mb, times["msgspec"], floor)
        show("structural", "validate_source, no output", mb, times["structural"], floor)
        show("+ write", "+ normalize, write normalized.jsonl", mb, times["write"], floor)

        from trainer_worker.tiny import build_tiny_chat_model

        tokenizer = load_tokenizer(str(build_tiny_chat_model(root / "tiny")))
        small = root / "small.jsonl"
        generate(small, min(args.token_mb, args.size_mb), seed=1)
        small_mb = small.stat().st_size / 1e6
        print(f"(token statistics on {small_mb:.1f} MB of the same kind of data)")
        times = measure(
            {
                "json": lambda: json_floor(small),
                "tokens": lambda: with_tokens(small, root, tokenizer),
            },
            args.repeat,
            (root / "normalized.jsonl",),
        )
        floor = small_mb / times["json"]
        show("json floor", "json.loads loop", small_mb, times["json"], floor)
        show("+ tokens", "+ write + token statistics", small_mb, times["tokens"], floor)


if __name__ == "__main__":
    main()
