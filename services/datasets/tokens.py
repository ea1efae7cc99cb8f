"""Token statistics of the normalized examples with the job's tokenizer and its chat template.

Chat data (and conversational prompts) is rendered with the tokenizer's chat template, as the trainer
renders it, then all texts of a batch are tokenized in one call of the fast (Rust) tokenizer. An example
counts as its longest sequence: prompt + chosen or prompt + rejected for preference pairs, the whole
conversation for chat, prompt + completion, the text, or the prompt alone for prompt-only data.
"""

from __future__ import annotations

import functools
import re
import statistics
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import msgspec

from services.datasets.domain import CHAT_FORMATS, DatasetFormat, TokenStats
from tuneforge_core.errors import FieldViolation, InvalidArgument

BATCH = 256
TOKENIZER_CACHE = 4
DEFAULT_MAX_LENGTH = 2048
# transformers' first import is not safe from two threads at once: its lazy module, half set up by one
# thread, told the other "cannot import name 'AutoTokenizer'" (two uploads naming tokenizers on a fresh
# server answered INTERNAL). So it is imported under this lock.
_IMPORTING = threading.Lock()


def _auto_tokenizer() -> Any:
    with _IMPORTING:
        from transformers import AutoTokenizer
    return AutoTokenizer


# A hub model id as the cache stores it: "name" or "org/name" (never a path: no "..", no leading "/").
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?\Z")
_REVISION_RE = re.compile(r"^[\w-][\w.-]*\Z")


def hub_cache() -> tuple[Path, Path]:
    """This machine's Hugging Face home (HF_HOME) and the hub cache in it (HF_HUB_CACHE)."""
    from huggingface_hub import constants

    return Path(constants.HF_HOME), Path(constants.HF_HUB_CACHE)


def cached_snapshot(model_id: str) -> Path | None:
    """The folder of hub model `model_id`'s main revision in the local Hugging Face cache, or None when it
    is not there. Reads the cache's folders only: huggingface_hub's own lookups (hf_hub_download, even with
    local_files_only) build request headers first, which may fetch a registry from huggingface.co."""
    if not _HUB_ID_RE.match(model_id) or ".." in model_id:
        return None
    repo = hub_cache()[1] / f"models--{model_id.replace('/', '--')}"
    try:
        commit = (repo / "refs" / "main").read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    snapshot = repo / "snapshots" / commit
    return snapshot if _REVISION_RE.match(commit) and snapshot.is_dir() else None


def _not_cached(name: str, field: str) -> InvalidArgument:
    home, cache = hub_cache()
    return InvalidArgument(
        f"The tokenizer '{name}' is not in this machine's Hugging Face cache ({cache}, HF_HOME={home}); "
        "models are not downloaded here. Download it into that cache first, or give a local model folder.",
        violations=[FieldViolation(field, f"not in this machine's Hugging Face cache (HF_HOME={home})")],
    )


@functools.lru_cache(maxsize=TOKENIZER_CACHE)
def load_tokenizer(name: str, field: str = "metadata.tokenizer") -> Any:
    """A tokenizer from a local folder or the local Hugging Face cache, never from the network and never
    with remote code; INVALID_ARGUMENT naming `field` when it cannot be loaded (at once for a hub id that
    is not in the cache: no request is made to find it).

    Cached (failures are not): the upload checks it before reading the stream and processing uses it
    again. Sharing one between threads is safe here because every call tokenizes with the same settings,
    so the Rust tokenizer is never reconfigured while another thread uses it.

    The trainer worker loads its models on its own (it may download them); this loader is for validation."""
    if Path(name).is_dir():
        folder = Path(name)
    elif (snapshot := cached_snapshot(name)) is not None:
        folder = snapshot
    elif _HUB_ID_RE.match(name) and ".." not in name:
        raise _not_cached(name, field)
    else:
        raise InvalidArgument(
            f"The tokenizer '{name}' cannot be loaded: no folder exists there, and it is not a hub model id.",
            violations=[FieldViolation(field, "no such folder, nor a hub model id")],
        )
    auto_tokenizer = _auto_tokenizer()
    try:
        # A folder: transformers reads its files and asks no hub for them.
        return auto_tokenizer.from_pretrained(str(folder), trust_remote_code=False, local_files_only=True)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError... for a bad tokenizer
        reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise InvalidArgument(
            f"The tokenizer '{name}' cannot be loaded ({reason}); give a local model folder or a model id "
            "that is in this machine's Hugging Face cache.",
            violations=[FieldViolation(field, "cannot be loaded offline as a tokenizer")],
        ) from None


def _plain(messages: Sequence[dict[str, Any]]) -> str:
    return "\n".join(f"{m['role']}: {_text(m['content'])}" for m in messages)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content)


class _Renderer:
    """Turns normalized records into the texts the trainer would tokenize."""

    def __init__(self, tokenizer: Any, fmt: DatasetFormat) -> None:
        self.tokenizer = tokenizer
        self.fmt = fmt
        self.templated = bool(getattr(tokenizer, "chat_template", None))

    def chat(self, messages: list[dict[str, Any]], tools: Any = None, *, prompt_only: bool = False) -> str:
        if self.templated:
            plain = (
                messages
                if all(isinstance(m["content"], str) for m in messages)
                else [{**m, "content": _text(m["content"])} for m in messages]
            )
            try:
                return str(
                    self.tokenizer.apply_chat_template(
                        plain, tools=tools, tokenize=False, add_generation_prompt=prompt_only
                    )
                )
            except Exception:  # a template that refuses a conversation (e.g. no tool role): count it plainly
                pass
        return _plain(messages)

    def _joined(self, prompt: Any, answer: Any) -> str:
        if isinstance(prompt, list):
            return self.chat([*prompt, *answer])
        return f"{prompt}{answer}"

    def texts(self, record: dict[str, Any]) -> list[str]:
        if self.fmt in CHAT_FORMATS:
            return [self.chat(record["messages"], record.get("tools"))]
        if self.fmt is DatasetFormat.TEXT:
            return [record["text"]]
        if "chosen" in record:
            return [
                self._joined(record["prompt"], record["chosen"]),
                self._joined(record["prompt"], record["rejected"]),
            ]
        if "completion" in record:
            return [self._joined(record["prompt"], record["completion"])]
        prompt = record["prompt"]
        return [self.chat(prompt, prompt_only=True) if isinstance(prompt, list) else prompt]


def _batches(lines: Iterable[bytes], size: int) -> Iterator[list[bytes]]:
    it = iter(lines)
    while batch := list(islice(it, size)):
        yield batch


def _counter(tokenizer: Any) -> Callable[[list[str], bool], list[int]]:
    """Counts the tokens of each text as `tokenizer(texts)["input_ids"]` would, but straight from the Rust
    tokenizer's `encode_batch_fast` (no offsets, no Python conversion of each encoding: about 1.3x
    faster) when the wrapper would not change its settings: no truncation, no padding, special tokens
    not split. Otherwise through the wrapper."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    encode = getattr(backend, "encode_batch_fast", None) or getattr(backend, "encode_batch", None)

    def wrapped(texts: list[str], special: bool) -> list[int]:
        ids = tokenizer(texts, add_special_tokens=special, return_attention_mask=False)["input_ids"]
        return list(map(len, ids))

    def direct(texts: list[str], special: bool) -> list[int]:
        if (
            encode is None
            or backend is None
            or backend.truncation is not None
            or backend.padding is not None
            or backend.encode_special_tokens
        ):
            return wrapped(texts, special)
        return list(map(len, encode(texts, add_special_tokens=special)))

    if encode is None or getattr(tokenizer, "split_special_tokens", False):
        return wrapped
    return direct


def token_lengths(normalized: Path, fmt: DatasetFormat, tokenizer: Any) -> list[int]:
    """Tokens of each example of a normalized JSONL file, in file order."""
    renderer = _Renderer(tokenizer, fmt)
    count = _counter(tokenizer)
    # Templates already hold the special tokens; plain strings get them like the trainer adds them.
    special = not renderer.templated or fmt not in CHAT_FORMATS
    decode = msgspec.json.Decoder().decode
    lengths: list[int] = []
    with normalized.open("rb") as f:
        for batch in _batches(f, BATCH):
            records = list(map(decode, batch))
            if fmt in CHAT_FORMATS or fmt is DatasetFormat.TEXT:  # one text per example
                lengths.extend(count([renderer.texts(r)[0] for r in records], special))
                continue
            texts: list[str] = []
            owners: list[int] = []
            for k, record in enumerate(records):
                for text in renderer.texts(record):
                    texts.append(text)
                    owners.append(k)
            best = [0] * len(batch)
            for owner, n in zip(owners, count(texts, special), strict=True):
                best[owner] = max(best[owner], n)
            lengths.extend(best)
    return lengths


def token_stats(
    lengths: Sequence[int], tokenizer: str, max_length: int, train: Iterable[bool] = ()
) -> TokenStats:
    """Min, median, p95 (nearest rank), max and total of `lengths`; `train` flags the train split's
    examples, whose lengths cut at max_length sum to train_tokens."""
    if not lengths:
        return TokenStats(tokenizer, 0, 0, 0, 0, 0, 0, max_length, 0)
    ordered = sorted(lengths)
    p95 = ordered[max(0, -(-95 * len(ordered) // 100) - 1)]
    train_tokens = sum(min(n, max_length) for n, is_train in zip(lengths, train, strict=False) if is_train)
    return TokenStats(
        tokenizer=tokenizer,
        min=ordered[0],
        median=int(statistics.median_low(ordered)),
        p95=p95,
        max=ordered[-1],
        total=sum(ordered),
        truncated_count=sum(1 for n in ordered if n > max_length),
        max_length=max_length,
        train_tokens=train_tokens,
    )
