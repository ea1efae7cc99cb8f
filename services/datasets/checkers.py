"""The rules of each dataset format for one parsed example, and the one normalized shape per family.

A checker reports every problem of an example through an `IssueSink` (so one round of fixes is enough)
and returns the normalized example when there is no error. The shapes are the contract with the trainer
(documented in dataset.proto and the README; the families are tuneforge_core.compat's):

  chat (OPENAI_CHAT, SHAREGPT, ALPACA)  {"messages": [{"role", "content"[, "weight"][, "tool_calls"]}]}
  PROMPT_COMPLETION                     {"prompt": str, "completion": str}
  TEXT                                  {"text": str}
  PREFERENCE, OPENAI_PREFERENCE         {"prompt", "chosen", "rejected"}: all strings or all message lists
  PROMPT_ONLY                           {"prompt": str | [messages], <extra columns as they were>}
  KTO                                   {"prompt": str, "completion": str, "label": bool}

Which format a line is in is detection.py's; the message lists inside one are messages.py's.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from services.datasets.domain import DatasetFormat, Severity
from services.datasets.issues import IssueCode, IssueSink, json_type, show, unknown_keys
from services.datasets.messages import (
    SHAREGPT_SHAPE,
    check_messages,
    image_paths,
    last_assistant_text,
    no_trainable_turn,
)


@dataclass(frozen=True)
class Example:
    """A valid example: its normalized record and what the statistics count.

    `target` is the text a classifier-style dataset would predict (the last assistant turn, the
    completion); `images` the image paths the example refers to (ZIP uploads).
    """

    record: dict[str, Any]
    messages: int
    characters: int
    target: str | None = None
    images: tuple[str, ...] = ()



def _string(
    obj: dict[str, Any],
    key: str,
    add: IssueSink,
    path: str = "",
    *,
    required: bool = True,
    allow_empty: bool = False,
) -> str | None:
    """obj[key] when it is a (non-empty) string; reports why not. Absent and not required: ""."""
    field = f"{path}{key}"
    if key not in obj:
        if required:
            add(IssueCode.MISSING_FIELD, f'The example has no "{key}" field.', field)
            return None
        return ""
    value = obj[key]
    if not isinstance(value, str):
        add(IssueCode.WRONG_TYPE, f'"{key}" must be a string, not {json_type(value)}.', field)
        return None
    if not allow_empty and not value.strip():
        add(IssueCode.EMPTY_VALUE, f'"{key}" is empty.', field)
        return None
    return value


# -- checkers ------------------------------------------------------------------------------------------


class FormatChecker(ABC):
    """The rules of one format for one parsed JSON object."""

    format: DatasetFormat
    keys: frozenset[str]

    @abstractmethod
    def check(self, obj: dict[str, Any], add: IssueSink) -> Example | None:
        """Reports the object's problems through `add`; returns the normalized example if it has no error."""


class OpenAIChatChecker(FormatChecker):
    """{"messages": [{"role", "content", "weight"?, "tool_calls"?}], "tools"?: [...], "images"?: [...]}"""

    format = DatasetFormat.OPENAI_CHAT
    keys = frozenset({"messages", "tools", "images", "parallel_tool_calls"})

    def check(self, obj: dict[str, Any], add: IssueSink) -> Example | None:
        if "messages" not in obj:
            add(
                IssueCode.MISSING_MESSAGES,
                'The example has no "messages" field; each line must look like '
                '{"messages": [{"role": "user", "content": "..."}, '
                '{"role": "assistant", "content": "..."}]}.',
                "messages",
            )
            return None
        unknown_keys(obj, self.keys, add)
        messages = check_messages(obj["messages"], add, "messages")
        tools = obj.get("tools")
        if tools is not None and not isinstance(tools, list):
            add(
                IssueCode.WRONG_TYPE,
                f'"tools" must be a list of tool definitions, not {json_type(tools)}.',
                "tools",
            )
            return None
        if messages is None:
            return None
        images = image_paths(obj, add, messages.image_parts)
        if images is None:
            return None
        no_trainable_turn(messages.items, add, "messages")
        record: dict[str, Any] = {"messages": messages.items}
        if tools:
            record["tools"] = tools
        if images:
            record["images"] = list(images)
        return Example(
            record, len(messages.items), messages.characters, last_assistant_text(messages.items), images
        )


class ShareGPTChecker(FormatChecker):
    """{"conversations": [{"from": "human|gpt|system|tool", "value"}], "system"?: str}"""

    format = DatasetFormat.SHAREGPT
    keys = frozenset({"conversations", "system", "images"})

    def check(self, obj: dict[str, Any], add: IssueSink) -> Example | None:
        if "conversations" not in obj:
            add(
                IssueCode.MISSING_FIELD,
                'The example has no "conversations" field; each line must look like '
                '{"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]}.',
                "conversations",
            )
            return None
        unknown_keys(obj, self.keys, add)
        system = _string(obj, "system", add, required=False, allow_empty=True)
        messages = check_messages(obj["conversations"], add, "conversations", SHAREGPT_SHAPE)
        if messages is None or system is None:
            return None
        items = messages.items
        if system.strip():
            if items[0]["role"] == "system":
                add(
                    IssueCode.SYSTEM_NOT_FIRST,
                    'The example has both a "system" field and a system turn; keep one.',
                    "system",
                )
                return None
            items = [{"role": "system", "content": system}, *items]
        images = image_paths(obj, add, messages.image_parts)
        if images is None:
            return None
        no_trainable_turn(items, add, "conversations")
        record: dict[str, Any] = {"messages": items}
        if images:
            record["images"] = list(images)
        return Example(
            record, len(items), messages.characters + len(system), last_assistant_text(items), images
        )


class AlpacaChecker(FormatChecker):
    """{"instruction": str, "input"?: str, "output": str, "system"?: str}"""

    format = DatasetFormat.ALPACA
    keys = frozenset({"instruction", "input", "output", "system"})

    def check(self, obj: dict[str, Any], add: IssueSink) -> Example | None:
        unknown_keys(obj, self.keys, add)
        instruction = _string(obj, "instruction", add)
        given = _string(obj, "input", add, required=False, allow_empty=True)
        output = _string(obj, "output", add)
        system = _string(obj, "system", add, required=False, allow_empty=True)
        if instruction is None or given is None or output is None or system is None:
            return None
        user = f"{instruction}\n\n{given}" if given.strip() else instruction
        messages = [{"role": "system", "content": system}] if system.strip() else []
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        return Example({"messages": messages}, len(messages), len(user) + len(output) + len(system), output)


class TextChecker(FormatChecker):
    format = DatasetFormat.TEXT
    keys = frozenset({"text"})

    def check(self, obj: dict[str, Any], add: IssueSink) -> Example | None:
        unknown_keys(obj, self.keys, add)
        text = _string(obj, "text", add)
        return None if text is None else Example({"text": text}, 0, len(text))


def _prompt_value(
    value: Any, add: IssueSink, field: str, *, require_assistant: bool
) -> tuple[Any, int] | None:
    """A string or a message list (conversational), normalized, with its character count."""
    if isinstance(value, str):
        if not value.strip():
            add(IssueCode.EMPTY_VALUE, f'"{field}" is empty.', field)
            return None
        return value, len(value)
    if isinstance(value, list):
        messages = check_messages(value, add, field, require_assistant=require_assistant)
        return None if messages is None else (messages.items, messages.characters)
    add(
        IssueCode.WRONG_TYPE,
        f'"{field}" must be a string or a list of messages, not {json_type(value)}.',
        field,
    )
    return None


def _prompt_completion(obj: dict[str, Any], add: IssueSink) -> tuple[Any, Any, int, str | None] | None:
    """prompt and completion: both strings, or (TRL's conversational shape) a prompt message list and a
    completion list of assistant turns. Returns them normalized, with characters and the target text."""
    for key in ("prompt", "completion"):
        if key not in obj:
            add(IssueCode.MISSING_FIELD, f'The example has no "{key}" field.', key)
    if "prompt" not in obj or "completion" not in obj:
        return None
    prompt, completion = obj["prompt"], obj["completion"]
    if isinstance(prompt, str) != isinstance(completion, str):
        add(
            IssueCode.MIXED_SHAPES,
            "prompt and completion must both be strings or both be message lists; this example mixes them.",
            "prompt",
        )
        return None
    p = _prompt_value(prompt, add, "prompt", require_assistant=False)
    c = _prompt_value(completion, add, "completion", require_assistant=True)
    if p is None or c is None:
        return None
    target = c[0] if isinstance(c[0], str) else last_assistant_text(c[0])
    return p[0], c[0], p[1] + c[1], target


class PromptCompletionChecker(FormatChecker):
    """{"prompt": str, "completion": str}, or both as message lists (conversational)."""

    format = DatasetFormat.PROMPT_COMPLETION
    keys = frozenset({"prompt", "completion"})

    def check(self, obj: dict[str, Any], add: IssueSink) -> Example | None:
        unknown_keys(obj, self.keys, add)
        pc = _prompt_completion(obj, add)
        if pc is None:
            return None
        prompt, completion, characters, target = pc
        return Example({"prompt": prompt, "completion": completion}, 0, characters, target)


class KTOChecker(FormatChecker):
    """{"prompt", "completion", "label": bool}: prompt and completion as for PROMPT_COMPLETION."""

    format = DatasetFormat.KTO
    keys = frozenset({"prompt", "completion", "label"})

    def check(self, obj: dict[str, Any], add: IssueSink) -> Example | None:
        unknown_keys(obj, self.keys, add)
        pc = _prompt_completion(obj, add)
        label = obj.get("label")
        if not isinstance(label, bool):
            add(
                IssueCode.INVALID_LABEL,
                f'"label" must be true (a desirable completion) or false, not {show(label)}.',
                "label",
            )
            return None
        if pc is None:
            return None
        prompt, completion, characters, _ = pc
        return Example(
            {"prompt": prompt, "completion": completion, "label": label},
            0,
            characters,
            "true" if label else "false",
        )


class PreferenceChecker(FormatChecker):
    """TRL's {"prompt", "chosen", "rejected"}: all strings, or all message lists."""

    format = DatasetFormat.PREFERENCE
    keys = frozenset({"prompt", "chosen", "rejected"})

    def check(self, obj: dict[str, Any], add: IssueSink) -> Example | None:
        unknown_keys(obj, self.keys, add)
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in obj]
        for key in missing:
            add(
                IssueCode.MISSING_FIELD,
                f'The example has no "{key}" field; preference pairs need prompt, chosen and rejected.',
                key,
            )
        if missing:
            return None
        return _pair(obj["prompt"], obj["chosen"], obj["rejected"], add, ("prompt", "chosen", "rejected"))


class OpenAIPreferenceChecker(FormatChecker):
    """{"input": {"messages": [...]}, "preferred_output": [assistant], "non_preferred_output": [assistant]}"""

    format = DatasetFormat.OPENAI_PREFERENCE
    keys = frozenset({"input", "preferred_output", "non_preferred_output"})

    def check(self, obj: dict[str, Any], add: IssueSink) -> Example | None:
        unknown_keys(obj, self.keys, add)
        missing = [k for k in sorted(self.keys) if k not in obj]
        for key in missing:
            add(
                IssueCode.MISSING_FIELD,
                f'The example has no "{key}" field; OpenAI preference rows need input, '
                "preferred_output and non_preferred_output.",
                key,
            )
        if missing:
            return None
        given = obj["input"]
        if not isinstance(given, dict) or "messages" not in given:
            add(
                IssueCode.WRONG_TYPE,
                '"input" must be an object with "messages": {"messages": [...]}.',
                "input",
            )
            return None
        return _pair(
            given["messages"],
            obj["preferred_output"],
            obj["non_preferred_output"],
            add,
            ("input.messages", "preferred_output", "non_preferred_output"),
            conversational=True,
        )


def _pair(
    prompt: Any,
    chosen: Any,
    rejected: Any,
    add: IssueSink,
    fields: tuple[str, str, str],
    *,
    conversational: bool = False,
) -> Example | None:
    kinds = {isinstance(v, str) for v in (prompt, chosen, rejected)}
    if len(kinds) > 1 or (conversational and True in kinds):
        add(
            IssueCode.MIXED_SHAPES,
            f"{', '.join(fields)} must be all strings or all message lists"
            f"{' (here: message lists)' if conversational else ''}; this example mixes them.",
            fields[0],
        )
        return None
    p = _prompt_value(prompt, add, fields[0], require_assistant=False)
    c = _prompt_value(chosen, add, fields[1], require_assistant=True)
    r = _prompt_value(rejected, add, fields[2], require_assistant=True)
    if p is None or c is None or r is None:
        return None
    if c[0] == r[0]:
        add(
            IssueCode.IDENTICAL_PAIR,
            "The chosen and rejected answers are the same, so the pair teaches nothing.",
            fields[1],
            severity=Severity.WARNING,
        )
    messages = len(p[0]) + len(c[0]) + len(r[0]) if isinstance(p[0], list) else 0
    return Example({"prompt": p[0], "chosen": c[0], "rejected": r[0]}, messages, p[1] + c[1] + r[1])


class PromptOnlyChecker(FormatChecker):
    """{"prompt": str | [messages], <any extra columns, kept as they are for reward functions>}"""

    format = DatasetFormat.PROMPT_ONLY
    keys = frozenset({"prompt"})

    def check(self, obj: dict[str, Any], add: IssueSink) -> Example | None:
        if "prompt" not in obj:
            add(IssueCode.MISSING_FIELD, 'The example has no "prompt" field.', "prompt")
            return None
        p = _prompt_value(obj["prompt"], add, "prompt", require_assistant=False)
        if p is None:
            return None
        record = {"prompt": p[0], **{k: v for k, v in obj.items() if k != "prompt"}}
        return Example(record, len(p[0]) if isinstance(p[0], list) else 0, p[1])


CHECKERS: dict[DatasetFormat, FormatChecker] = {
    c.format: c
    for c in (
        OpenAIChatChecker(),
        ShareGPTChecker(),
        AlpacaChecker(),
        TextChecker(),
        PromptCompletionChecker(),
        KTOChecker(),
        PreferenceChecker(),
        OpenAIPreferenceChecker(),
        PromptOnlyChecker(),
    )
}
