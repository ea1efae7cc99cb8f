"""The rules of each dataset format for one parsed example, and the one normalized shape per family.

A checker reports every problem of an example through an `IssueSink` (so one round of fixes is enough)
and returns the normalized example when there is no error. The shapes are the contract with the trainer
(documented in dataset.proto and the README):

  chat (OPENAI_CHAT, SHAREGPT, ALPACA)  {"messages": [{"role", "content"[, "weight"][, "tool_calls"]}]}
  PROMPT_COMPLETION                     {"prompt": str, "completion": str}
  TEXT                                  {"text": str}
  PREFERENCE, OPENAI_PREFERENCE         {"prompt", "chosen", "rejected"}: all strings or all message lists
  PROMPT_ONLY                           {"prompt": str | [messages], <extra columns as they were>}
  KTO                                   {"prompt": str, "completion": str, "label": bool}

Detection is by keys (`SIGNATURES`, most specific first), so it is cheap enough to run on every line:
that is how a file mixing formats is caught line by line.
"""

from __future__ import annotations

import json
import operator
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import chain, repeat
from typing import Any, Literal

import msgspec

from services.datasets.domain import DatasetFormat, Severity

# Stable issue codes (ValidationIssue.code); clients may branch on them.
MISSING_MESSAGES = "MISSING_MESSAGES"
MESSAGES_NOT_A_LIST = "MESSAGES_NOT_A_LIST"
EMPTY_MESSAGES = "EMPTY_MESSAGES"
MESSAGE_NOT_AN_OBJECT = "MESSAGE_NOT_AN_OBJECT"
MISSING_ROLE = "MISSING_ROLE"
INVALID_ROLE = "INVALID_ROLE"
MISSING_CONTENT = "MISSING_CONTENT"
CONTENT_NOT_A_STRING = "CONTENT_NOT_A_STRING"
EMPTY_CONTENT = "EMPTY_CONTENT"
INVALID_WEIGHT = "INVALID_WEIGHT"
INVALID_TOOL_CALL = "INVALID_TOOL_CALL"
TOOL_WITHOUT_CALL = "TOOL_WITHOUT_CALL"
SYSTEM_NOT_FIRST = "SYSTEM_NOT_FIRST"
ROLES_NOT_ALTERNATING = "ROLES_NOT_ALTERNATING"
MISSING_ASSISTANT_TURN = "MISSING_ASSISTANT_TURN"
MISSING_FIELD = "MISSING_FIELD"
WRONG_TYPE = "WRONG_TYPE"
EMPTY_VALUE = "EMPTY_VALUE"
INVALID_LABEL = "INVALID_LABEL"
MIXED_SHAPES = "MIXED_SHAPES"
INVALID_CONTENT_PART = "INVALID_CONTENT_PART"
# Warnings.
NO_TRAINABLE_TURN = "NO_TRAINABLE_TURN"
UNKNOWN_FIELD = "UNKNOWN_FIELD"
IDENTICAL_PAIR = "IDENTICAL_PAIR"

CHAT_FAMILY = frozenset({DatasetFormat.OPENAI_CHAT, DatasetFormat.SHAREGPT, DatasetFormat.ALPACA})
PREFERENCE_FAMILY = frozenset({DatasetFormat.PREFERENCE, DatasetFormat.OPENAI_PREFERENCE})

IssueSink = Callable[..., None]
"""`add(code, message, field="", message_index=None, severity=Severity.ERROR)` for the current line."""


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


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def show(value: Any, limit: int = 40) -> str:
    """A user's value quoted in a message, short enough for an error listing."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _unknown_keys(
    obj: dict[str, Any], allowed: frozenset[str], add: IssueSink, prefix: str = "", index: int | None = None
) -> None:
    for key in obj:
        if key not in allowed:
            add(
                UNKNOWN_FIELD,
                f'"{key}" is not a field of this format and is dropped; known fields: '
                f"{', '.join(sorted(allowed))}.",
                f"{prefix}{key}",
                index,
                severity=Severity.WARNING,
            )


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
            add(MISSING_FIELD, f'The example has no "{key}" field.', field)
            return None
        return ""
    value = obj[key]
    if not isinstance(value, str):
        add(WRONG_TYPE, f'"{key}" must be a string, not {json_type(value)}.', field)
        return None
    if not allow_empty and not value.strip():
        add(EMPTY_VALUE, f'"{key}" is empty.', field)
        return None
    return value


# -- messages ------------------------------------------------------------------------------------------

OPENAI_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "tool": "tool",
    "observation": "tool",
}
MESSAGE_KEYS = frozenset({"role", "content", "weight", "tool_calls", "tool_call_id", "name"})
SHAREGPT_KEYS = frozenset({"from", "value", "weight"})


@dataclass(frozen=True)
class MessageShape:
    """How one format spells a message: OpenAI's role/content or ShareGPT's from/value."""

    role_key: str = "role"
    content_key: str = "content"
    roles: dict[str, str] | None = None
    keys: frozenset[str] = MESSAGE_KEYS
    tool_calls: bool = True

    def role_names(self) -> str:
        return ", ".join(self.roles or OPENAI_ROLES)


OPENAI_SHAPE = MessageShape(roles=OPENAI_ROLES)
SHAREGPT_SHAPE = MessageShape("from", "value", SHAREGPT_ROLES, SHAREGPT_KEYS, tool_calls=False)


@dataclass
class Messages:
    """Normalized messages of one list, with what the statistics and the images check need."""

    items: list[dict[str, Any]]
    characters: int
    image_parts: int


def _tool_calls(value: Any, add: IssueSink, path: str, i: int) -> list[dict[str, Any]] | None:
    if not isinstance(value, list) or not value:
        add(
            INVALID_TOOL_CALL,
            f"Message {i} tool_calls must be a non-empty list, not {json_type(value)}.",
            path,
            i,
        )
        return None
    out: list[dict[str, Any]] = []
    ok = True
    for j, call in enumerate(value):
        cpath = f"{path}[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            add(
                INVALID_TOOL_CALL,
                f'Tool call {j} of message {i} must be an object with a "function" '
                'object: {"type": "function", "function": {"name": ..., "arguments": ...}}.',
                cpath,
                i,
            )
            ok = False
            continue
        assert isinstance(call, dict)
        if call.get("type", "function") != "function":
            add(
                INVALID_TOOL_CALL,
                f"Tool call {j} of message {i} has type {show(call.get('type'))}; only "
                '"function" is supported.',
                f"{cpath}.type",
                i,
            )
            ok = False
        name = function.get("name")
        if not isinstance(name, str) or not name.strip():
            add(
                INVALID_TOOL_CALL,
                f"Tool call {j} of message {i} needs a function name.",
                f"{cpath}.function.name",
                i,
            )
            ok = False
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError:
                arguments = None
        if not isinstance(arguments, dict):
            add(
                INVALID_TOOL_CALL,
                f"Tool call {j} of message {i} arguments must be a JSON object (or a string holding one).",
                f"{cpath}.function.arguments",
                i,
            )
            ok = False
        if ok:
            entry: dict[str, Any] = {}
            if isinstance(call.get("id"), str):
                entry["id"] = call["id"]
            entry["type"] = "function"
            entry["function"] = {"name": name, "arguments": arguments}
            out.append(entry)
    return out if ok else None


def _content_parts(parts: list[Any], add: IssueSink, path: str, i: int) -> tuple[Any, int, int] | None:
    """A content given as parts: texts joined into one string when there is no image (the canonical
    shape); kept as [{"type": "text", "text"} | {"type": "image"}] parts when there are images."""
    normalized: list[dict[str, Any]] = []
    images = characters = 0
    ok = True
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            normalized.append({"type": "text", "text": part["text"]})
            characters += len(part["text"])
        elif kind == "image":
            normalized.append({"type": "image"})
            images += 1
        else:
            add(
                INVALID_CONTENT_PART,
                f'Content part {j} of message {i} must be {{"type": "text", "text": '
                f'...}} or {{"type": "image"}}, not {show(part)}.',
                f"{path}[{j}]",
                i,
            )
            ok = False
    if not ok:
        return None
    if not images:
        return "".join(p["text"] for p in normalized), characters, 0
    return normalized, characters, images


def check_messages(
    messages: Any,
    add: IssueSink,
    field: str,
    shape: MessageShape = OPENAI_SHAPE,
    *,
    require_assistant: bool = True,
) -> Messages | None:
    """Checks a message list: each message, then the order of the roles. None when anything is wrong."""
    if not isinstance(messages, list):
        add(MESSAGES_NOT_A_LIST, f'"{field}" must be a list of messages, not {json_type(messages)}.', field)
        return None
    if not messages:
        add(
            EMPTY_MESSAGES,
            f'"{field}" is empty; an example needs at least a user and an assistant message.',
            field,
        )
        return None
    roles = shape.roles or OPENAI_ROLES
    ok = True
    role_problem = False
    items: list[dict[str, Any]] = []
    characters = image_parts = 0
    for i, message in enumerate(messages):
        path = f"{field}[{i}]"
        if not isinstance(message, dict):
            add(
                MESSAGE_NOT_AN_OBJECT,
                f"Message {i} must be an object with {shape.role_key} and "
                f"{shape.content_key}, not {json_type(message)}.",
                path,
                i,
            )
            ok, role_problem = False, True
            continue
        good = True
        raw_role = message.get(shape.role_key)
        role = roles.get(raw_role) if isinstance(raw_role, str) else None
        if shape.role_key not in message:
            add(
                MISSING_ROLE,
                f'Message {i} has no "{shape.role_key}"; use one of {shape.role_names()}.',
                f"{path}.{shape.role_key}",
                i,
            )
            good, role_problem = False, True
        elif role is None:
            add(
                INVALID_ROLE,
                f"Message {i} has {shape.role_key} {show(raw_role)}; use one of {shape.role_names()}.",
                f"{path}.{shape.role_key}",
                i,
            )
            good, role_problem = False, True
        calls = None
        if shape.tool_calls and "tool_calls" in message:
            if role != "assistant":
                add(
                    INVALID_TOOL_CALL,
                    f"Message {i} has tool_calls, which only assistant messages may have.",
                    f"{path}.tool_calls",
                    i,
                )
                good = False
            else:
                calls = _tool_calls(message["tool_calls"], add, f"{path}.tool_calls", i)
                good = good and calls is not None
        content: Any = message.get(shape.content_key)
        cpath = f"{path}.{shape.content_key}"
        calls_given = shape.tool_calls and "tool_calls" in message
        if shape.content_key not in message or (content is None and calls_given):
            if calls_given:
                content = ""  # an assistant turn that only calls tools
            else:
                add(MISSING_CONTENT, f'Message {i} has no "{shape.content_key}".', cpath, i)
                good = False
        elif isinstance(content, list):
            parts = _content_parts(content, add, cpath, i)
            if parts is None:
                good = False
            else:
                content, chars, images = parts
                characters += chars
                image_parts += images
                if not images and not content.strip():
                    add(EMPTY_CONTENT, f"Message {i} content is empty.", cpath, i)
                    good = False
        elif not isinstance(content, str):
            add(
                CONTENT_NOT_A_STRING,
                f"Message {i} content must be a string, not {json_type(content)}.",
                cpath,
                i,
            )
            good = False
        elif not content.strip() and not calls:
            add(EMPTY_CONTENT, f"Message {i} content is empty.", cpath, i)
            good = False
        else:
            characters += len(content)
        weight = message.get("weight")
        if "weight" in message and (
            isinstance(weight, bool) or not isinstance(weight, int | float) or weight not in (0, 1)
        ):
            add(
                INVALID_WEIGHT,
                f"Message {i} weight is {show(weight)}; it must be 0 (do not train on this message) or 1.",
                f"{path}.weight",
                i,
            )
            good = False
        _unknown_keys(message, shape.keys, add, f"{path}.", i)
        if not good:
            ok = False
            continue
        entry: dict[str, Any] = {"role": role, "content": content}
        if "weight" in message:
            entry["weight"] = int(weight)
        if calls:
            entry["tool_calls"] = calls
        items.append(entry)
    if role_problem:
        return None
    if require_assistant and not any(m["role"] == "assistant" for m in items) and ok:
        add(
            MISSING_ASSISTANT_TURN,
            "The example has no assistant message, so there is nothing to train on; "
            'add at least one message with role "assistant".',
            field,
        )
        return None
    if ok and not _check_order(items, add, field):
        return None
    return Messages(items, characters, image_parts) if ok else None


def _check_order(items: list[dict[str, Any]], add: IssueSink, field: str) -> bool:
    """System first only; user and assistant alternate; tool results answer an assistant's tool calls."""
    ok = True
    previous: dict[str, Any] | None = None
    for i, m in enumerate(items):
        role = m["role"]
        if role == "system" and i > 0:
            add(
                SYSTEM_NOT_FIRST,
                f"Message {i} is a system message; only the first message may be one.",
                f"{field}[{i}].role",
                i,
            )
            ok = False
        elif role == "tool" and (
            previous is None or not (previous["role"] == "tool" or previous.get("tool_calls"))
        ):
            add(
                TOOL_WITHOUT_CALL,
                f"Message {i} is a tool result, but the message before it is not an "
                "assistant tool call (or another tool result).",
                f"{field}[{i}].role",
                i,
            )
            ok = False
        elif previous is not None and role in ("user", "assistant") and previous["role"] == role:
            add(
                ROLES_NOT_ALTERNATING,
                f"Messages {i - 1} and {i} are both {role} messages; user and "
                "assistant turns must alternate (merge them into one).",
                f"{field}[{i}].role",
                i,
            )
            ok = False
        previous = m
    return ok


def _last_assistant(items: list[dict[str, Any]]) -> str | None:
    for m in reversed(items):
        if m["role"] == "assistant":
            return m["content"] if isinstance(m["content"], str) else None
    return None


def _no_trainable_turn(items: list[dict[str, Any]], add: IssueSink, field: str) -> None:
    if not any(m.get("weight", 1) for m in items if m["role"] == "assistant"):
        add(
            NO_TRAINABLE_TURN,
            "Every assistant message has weight 0, so training learns nothing from this example.",
            field,
            severity=Severity.WARNING,
        )


def _images(obj: dict[str, Any], add: IssueSink, image_parts: int) -> tuple[str, ...] | None:
    """The example's "images" list: paths (ZIP uploads) matching its {"type": "image"} parts in number."""
    raw = obj.get("images", [])
    if not isinstance(raw, list) or not all(isinstance(p, str) and p for p in raw):
        add(WRONG_TYPE, '"images" must be a list of image paths inside the ZIP.', "images")
        return None
    if len(raw) != image_parts:
        add(
            INVALID_CONTENT_PART,
            f'The example lists {len(raw)} image(s) in "images" but has {image_parts} '
            '{"type": "image"} content part(s); they must match one to one, in order.',
            "images",
        )
        return None
    return tuple(raw)


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
                MISSING_MESSAGES,
                'The example has no "messages" field; each line must look like '
                '{"messages": [{"role": "user", "content": "..."}, '
                '{"role": "assistant", "content": "..."}]}.',
                "messages",
            )
            return None
        _unknown_keys(obj, self.keys, add)
        messages = check_messages(obj["messages"], add, "messages")
        tools = obj.get("tools")
        if tools is not None and not isinstance(tools, list):
            add(WRONG_TYPE, f'"tools" must be a list of tool definitions, not {json_type(tools)}.', "tools")
            return None
        if messages is None:
            return None
        images = _images(obj, add, messages.image_parts)
        if images is None:
            return None
        _no_trainable_turn(messages.items, add, "messages")
        record: dict[str, Any] = {"messages": messages.items}
        if tools:
            record["tools"] = tools
        if images:
            record["images"] = list(images)
        return Example(
            record, len(messages.items), messages.characters, _last_assistant(messages.items), images
        )


class ShareGPTChecker(FormatChecker):
    """{"conversations": [{"from": "human|gpt|system|tool", "value"}], "system"?: str}"""

    format = DatasetFormat.SHAREGPT
    keys = frozenset({"conversations", "system", "images"})

    def check(self, obj: dict[str, Any], add: IssueSink) -> Example | None:
        if "conversations" not in obj:
            add(
                MISSING_FIELD,
                'The example has no "conversations" field; each line must look like '
                '{"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]}.',
                "conversations",
            )
            return None
        _unknown_keys(obj, self.keys, add)
        system = _string(obj, "system", add, required=False, allow_empty=True)
        messages = check_messages(obj["conversations"], add, "conversations", SHAREGPT_SHAPE)
        if messages is None or system is None:
            return None
        items = messages.items
        if system.strip():
            if items[0]["role"] == "system":
                add(
                    SYSTEM_NOT_FIRST,
                    'The example has both a "system" field and a system turn; keep one.',
                    "system",
                )
                return None
            items = [{"role": "system", "content": system}, *items]
        images = _images(obj, add, messages.image_parts)
        if images is None:
            return None
        _no_trainable_turn(items, add, "conversations")
        record: dict[str, Any] = {"messages": items}
        if images:
            record["images"] = list(images)
        return Example(record, len(items), messages.characters + len(system), _last_assistant(items), images)


class AlpacaChecker(FormatChecker):
    """{"instruction": str, "input"?: str, "output": str, "system"?: str}"""

    format = DatasetFormat.ALPACA
    keys = frozenset({"instruction", "input", "output", "system"})

    def check(self, obj: dict[str, Any], add: IssueSink) -> Example | None:
        _unknown_keys(obj, self.keys, add)
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
        _unknown_keys(obj, self.keys, add)
        text = _string(obj, "text", add)
        return None if text is None else Example({"text": text}, 0, len(text))


def _prompt_value(
    value: Any, add: IssueSink, field: str, *, require_assistant: bool
) -> tuple[Any, int] | None:
    """A string or a message list (conversational), normalized, with its character count."""
    if isinstance(value, str):
        if not value.strip():
            add(EMPTY_VALUE, f'"{field}" is empty.', field)
            return None
        return value, len(value)
    if isinstance(value, list):
        messages = check_messages(value, add, field, require_assistant=require_assistant)
        return None if messages is None else (messages.items, messages.characters)
    add(WRONG_TYPE, f'"{field}" must be a string or a list of messages, not {json_type(value)}.', field)
    return None


def _prompt_completion(obj: dict[str, Any], add: IssueSink) -> tuple[Any, Any, int, str | None] | None:
    """prompt and completion: both strings, or (TRL's conversational shape) a prompt message list and a
    completion list of assistant turns. Returns them normalized, with characters and the target text."""
    for key in ("prompt", "completion"):
        if key not in obj:
            add(MISSING_FIELD, f'The example has no "{key}" field.', key)
    if "prompt" not in obj or "completion" not in obj:
        return None
    prompt, completion = obj["prompt"], obj["completion"]
    if isinstance(prompt, str) != isinstance(completion, str):
        add(
            MIXED_SHAPES,
            "prompt and completion must both be strings or both be message lists; this example mixes them.",
            "prompt",
        )
        return None
    p = _prompt_value(prompt, add, "prompt", require_assistant=False)
    c = _prompt_value(completion, add, "completion", require_assistant=True)
    if p is None or c is None:
        return None
    target = c[0] if isinstance(c[0], str) else _last_assistant(c[0])
    return p[0], c[0], p[1] + c[1], target


class PromptCompletionChecker(FormatChecker):
    """{"prompt": str, "completion": str}, or both as message lists (conversational)."""

    format = DatasetFormat.PROMPT_COMPLETION
    keys = frozenset({"prompt", "completion"})

    def check(self, obj: dict[str, Any], add: IssueSink) -> Example | None:
        _unknown_keys(obj, self.keys, add)
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
        _unknown_keys(obj, self.keys, add)
        pc = _prompt_completion(obj, add)
        label = obj.get("label")
        if not isinstance(label, bool):
            add(
                INVALID_LABEL,
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
        _unknown_keys(obj, self.keys, add)
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in obj]
        for key in missing:
            add(
                MISSING_FIELD,
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
        _unknown_keys(obj, self.keys, add)
        missing = [k for k in sorted(self.keys) if k not in obj]
        for key in missing:
            add(
                MISSING_FIELD,
                f'The example has no "{key}" field; OpenAI preference rows need input, '
                "preferred_output and non_preferred_output.",
                key,
            )
        if missing:
            return None
        given = obj["input"]
        if not isinstance(given, dict) or "messages" not in given:
            add(WRONG_TYPE, '"input" must be an object with "messages": {"messages": [...]}.', "input")
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
            MIXED_SHAPES,
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
            IDENTICAL_PAIR,
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
            add(MISSING_FIELD, 'The example has no "prompt" field.', "prompt")
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

# Detection signatures, most specific first: the keys an object of each format must have.
SIGNATURES: tuple[tuple[DatasetFormat, frozenset[str]], ...] = (
    (DatasetFormat.OPENAI_CHAT, frozenset({"messages"})),
    (DatasetFormat.SHAREGPT, frozenset({"conversations"})),
    (DatasetFormat.OPENAI_PREFERENCE, frozenset({"input", "preferred_output", "non_preferred_output"})),
    (DatasetFormat.PREFERENCE, frozenset({"chosen", "rejected"})),
    (DatasetFormat.ALPACA, frozenset({"instruction", "output"})),
    (DatasetFormat.KTO, frozenset({"prompt", "completion", "label"})),
    (DatasetFormat.PROMPT_COMPLETION, frozenset({"prompt", "completion"})),
    (DatasetFormat.PROMPT_ONLY, frozenset({"prompt"})),
    (DatasetFormat.TEXT, frozenset({"text"})),
)


def classify(obj: dict[str, Any]) -> DatasetFormat | None:
    """The format an object's keys say it is, or None when they match no format."""
    for fmt, keys in SIGNATURES:
        if keys <= obj.keys():
            return fmt
    return None


def detect(objects: Iterable[dict[str, Any]]) -> DatasetFormat | None:
    """The format most objects match (ties: the first one seen), or None when none matches any."""
    votes: dict[DatasetFormat, int] = {}
    for obj in objects:
        fmt = classify(obj)
        if fmt is not None:
            votes[fmt] = votes.get(fmt, 0) + 1
    return max(votes, key=lambda f: votes[f]) if votes else None


def same_family(a: DatasetFormat, b: DatasetFormat) -> bool:
    """Whether examples of a and b normalize to the same shape (so their files can be mixed in splits)."""
    return a == b or {a, b} <= CHAT_FAMILY or {a, b} <= PREFERENCE_FAMILY


# -- options that change the examples ------------------------------------------------------------------

TEMPLATE_FIELDS = frozenset({"prompt", "system_prompt"})


def _wrap_user_turns(messages: list[dict[str, Any]], template: str, system_prompt: str) -> None:
    for m in messages:
        if m["role"] == "user" and isinstance(m["content"], str):
            m["content"] = template.format(prompt=m["content"], system_prompt=system_prompt)


def _with_system(messages: list[dict[str, Any]], system_prompt: str) -> list[dict[str, Any]]:
    if not system_prompt or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def _wrap_prompt(prompt: Any, template: str, system_prompt: str, template_has_system: bool) -> Any:
    if isinstance(prompt, list):
        if template:
            _wrap_user_turns(prompt, template, system_prompt)
        return prompt if template_has_system else _with_system(prompt, system_prompt)
    if template:
        prompt = template.format(prompt=prompt, system_prompt=system_prompt)
    if system_prompt and not template_has_system:
        prompt = f"{system_prompt}\n\n{prompt}"
    return prompt


def apply_options(
    record: dict[str, Any], fmt: DatasetFormat, system_prompt: str, template: str
) -> dict[str, Any]:
    """The normalized record with the global system prompt and the prompt template applied (in place).

    The template wraps string prompts and user turns; a template that places {system_prompt} itself
    takes the system prompt, otherwise it becomes a system message (conversations) or a prefix (strings).
    TEXT has no prompt: only the system prompt applies, as a prefix.
    """
    if not system_prompt and not template:
        return record
    has_system = "{system_prompt}" in template
    if fmt in CHAT_FAMILY:
        if template:
            _wrap_user_turns(record["messages"], template, system_prompt)
        if not has_system:
            record["messages"] = _with_system(record["messages"], system_prompt)
    elif fmt is DatasetFormat.TEXT:
        if system_prompt:
            record["text"] = f"{system_prompt}\n\n{record['text']}"
    else:
        record["prompt"] = _wrap_prompt(record["prompt"], template, system_prompt, has_system)
    return record


# -- the fast path for OpenAI chat ---------------------------------------------------------------------


# frozen: hashable in C, so duplicates are counted without encoding (see chat_digest). gc=False: they hold
# only strings, ints and tuples of such structs, so the garbage collector need not track them, which makes
# decoding them about 1.5x faster.
class _FastMessage(msgspec.Struct, forbid_unknown_fields=True, frozen=True, gc=False):
    role: Literal["system", "user", "assistant"]
    content: str
    weight: Literal[0, 1] | msgspec.UnsetType = msgspec.UNSET


class FastChat(msgspec.Struct, forbid_unknown_fields=True, frozen=True, gc=False):
    """A plain OpenAI chat line as msgspec decodes it; it encodes to its normalized line."""

    messages: tuple[_FastMessage, ...]


_decode_fast_chat = msgspec.json.Decoder(FastChat).decode
_messages = operator.attrgetter("messages")
_content = operator.attrgetter("content")
_role = operator.attrgetter("role")
_weight = operator.attrgetter("weight")


def _role_orders(longest: int) -> frozenset[tuple[str, ...]]:
    """Every role sequence the chat rules accept, up to `longest` messages: an optional system message,
    then user and assistant turns alternating, at least one of them an assistant turn."""
    orders: set[tuple[str, ...]] = set()
    for n in range(1, longest + 1):
        for first, second in (("user", "assistant"), ("assistant", "user")):
            turns = tuple(first if k % 2 == 0 else second for k in range(n))
            if "assistant" in turns:
                orders.add(turns)
                if n < longest:
                    orders.add(("system", *turns))
    return frozenset(orders)


# Longer conversations are checked message by message (_fast_example).
_ROLE_ORDERS = _role_orders(32)


@dataclass(frozen=True, slots=True)
class FastBatch:
    """Consecutive lines, the first numbered `start`, that are all plain, valid OpenAI chat lines."""

    start: int
    rows: list[FastChat]
    messages: int
    characters: int


def fast_chat_batch(start: int, lines: list[bytes]) -> FastBatch | None:
    """The lines as one FastBatch when every one is a plain, valid chat line (the common case); None
    otherwise, and each line then goes to fast_chat on its own.

    Each line is decoded on its own (joining them into one JSON array would let a line holding two
    objects, or an object split over two lines, pass), and the rules are checked over the whole batch
    at once, in C: no blank content, a known role order, and no weight 0 (which may leave nothing to
    train on: those lines take the per-line check)."""
    try:
        rows = list(map(_decode_fast_chat, lines))
    except (msgspec.DecodeError, RecursionError):  # ValidationError is a DecodeError
        return None
    conversations = list(map(_messages, rows))
    messages = list(chain.from_iterable(conversations))
    contents = list(map(_content, messages))
    if (
        not all(contents)
        or any(map(str.isspace, contents))
        or 0 in map(_weight, messages)
        or not all(map(_ROLE_ORDERS.__contains__, map(tuple, map(map, repeat(_role), conversations))))
    ):
        return None
    return FastBatch(start, rows, len(messages), sum(map(len, contents)))


def chat_counts(rows: list[FastChat]) -> tuple[int, int]:
    """(messages, characters) of some FastBatch rows."""
    messages = list(chain.from_iterable(map(_messages, rows)))
    return len(messages), sum(map(len, map(_content, messages)))


def last_assistant(row: FastChat) -> str | None:
    """The target of a FastBatch row: its last assistant turn."""
    for m in reversed(row.messages):
        if m.role == "assistant":
            return m.content
    return None


def chat_digest(encoded: bytes) -> int:
    """The duplicate-counting digest of a normalized line (without its line end) in a file that takes the
    fast path: the hash of its FastChat when it decodes as one (as hash(row) for a FastBatch row, since a
    row encodes to its normalized line and back), else the hash of the bytes. Equal lines, equal digests."""
    try:
        return hash(_decode_fast_chat(encoded))
    except (msgspec.DecodeError, RecursionError):
        return hash(encoded)


def fast_chat(line: bytes) -> Example | None:
    """The example of a plain, valid OpenAI chat line, decoded and type-checked by msgspec in C; None
    for anything else (tools, images, extra keys, a problem, a warning), which then takes the full
    checker, the only source of issues. Its record is the msgspec struct, which encodes to exactly what
    OpenAIChatChecker's normalized record encodes to."""
    try:
        row = _decode_fast_chat(line)
    except (msgspec.DecodeError, RecursionError):
        return None
    return _fast_example(row)


def _fast_example(row: FastChat) -> Example | None:
    """The rules msgspec's types do not express: non-blank content, a leading system message only,
    alternating turns, a trainable assistant turn."""
    messages = row.messages
    if not messages:
        return None
    previous = ""
    characters = 0
    trainable = False
    target = None
    unset = msgspec.UNSET
    for m in messages:
        content = m.content
        if not content or content.isspace():
            return None
        role = m.role
        if role == previous or (role == "system" and previous):
            return None
        if role == "assistant":
            target = content
            trainable = trainable or m.weight is unset or m.weight == 1
        previous = role
        characters += len(content)
    if not trainable:
        return None
    return Example(row, len(messages), characters, target)  # type: ignore[arg-type]
