"""Validation throughput of the datasets service, in MB/s per core, on a generated chat JSONL.

    .venv/bin/python benchmarks/bench_validation.py              # 200 MB
    .venv/bin/python benchmarks/bench_validation.py --mb 50      # smaller, on a busy machine

Prints, over the same file and each in one thread (so MB/s of CPU time is MB/s per core):
  floor       a plain `json.loads` loop over the lines (what any Python validator pays to parse)
  msgspec     msgspec's decoder over the lines (the parser validation uses)
  structural  the full validation: parse, check every format rule, normalize, hash for duplicates,
              write the normalized file (services.datasets.validation.validate_source)
  + tokens    structural validation plus token statistics with the tiny model's tokenizer and chat
              template (trainer_worker.tiny), the path an upload with metadata.tokenizer takes
Each figure is the median of --repeat runs; MB are 10^6 bytes of the input file.
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


def cpu_seconds(work: Callable[[], object]) -> float:
    start = time.process_time()
    work()
    return time.process_time() - start


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
    with (work / "normalized.jsonl").open("wb") as out:
        report = validate_source(path, work_dir=work, format=None, min_examples=1, normalized_out=out).report
    assert report.valid and report.format is DatasetFormat.OPENAI_CHAT, report.issues[:3]


def with_tokens(path: Path, work: Path, tokenizer: object) -> None:
    structural(path, work)
    token_lengths(work / "normalized.jsonl", DatasetFormat.OPENAI_CHAT, tokenizer)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=float, default=200.0, help="size of the generated file in MB")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the median is shown")
    parser.add_argument(
        "--token-mb",
        type=float,
        default=20.0,
        help="size of the file for the token-statistics run (tokenizing is ~10x slower)",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-validation-") as tmp:
        root = Path(tmp)
        data = root / "chat.jsonl"
        lines = generate(data, args.mb)
        size_mb = data.stat().st_size / 1e6
        print(f"file: {size_mb:.1f} MB, {lines} chat examples, python {sys.version.split()[0]}")

        def rate(work: Callable[[], object], mb: float = size_mb) -> str:
            seconds = statistics.median(cpu_seconds(work) for _ in range(args.repeat))
            return f"{mb / seconds:8.1f} MB/s per core ({seconds:.2f} s CPU)"

        floor = rate(lambda: json_floor(data))
        print(f"floor       json.loads loop        {floor}")
        print(f"msgspec     decoder loop           {rate(lambda: msgspec_floor(data))}")
        print(f"structural  validate_source        {rate(lambda: structural(data, root))}")

        from trainer_worker.tiny import build_tiny_chat_model

        model = build_tiny_chat_model(root / "tiny")
        tokenizer = load_tokenizer(str(model))
        small = root / "small.jsonl"
        generate(small, min(args.token_mb, args.mb), seed=1)
        small_mb = small.stat().st_size / 1e6
        print(f"(token run on {small_mb:.1f} MB of the same kind of data)")
        print(f"floor       json.loads loop        {rate(lambda: json_floor(small), small_mb)}")
        print(f"structural  validate_source        {rate(lambda: structural(small, root), small_mb)}")
        print(
            f"+ tokens    with token statistics  "
            f"{rate(lambda: with_tokens(small, root, tokenizer), small_mb)}"
        )


if __name__ == "__main__":
    main()
