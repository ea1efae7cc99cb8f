"""The rules of a message list, shared by every format that holds conversations: each message, then
the order of the roles. OpenAI's role/content and ShareGPT's from/value are two spellings (`MessageShape`)
of the same rules, and both normalize to OpenAI's {"role", "content"[, "weight"][, "tool_calls"]}.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from services.datasets.domain import Severity
from services.datasets.issues import IssueCode, IssueSink, json_type, show, unknown_keys

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
            IssueCode.INVALID_TOOL_CALL,
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
                IssueCode.INVALID_TOOL_CALL,
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
                IssueCode.INVALID_TOOL_CALL,
                f"Tool call {j} of message {i} has type {show(call.get('type'))}; only "
                '"function" is supported.',
                f"{cpath}.type",
                i,
            )
            ok = False
        name = function.get("name")
        if not isinstance(name, str) or not name.strip():
            add(
                IssueCode.INVALID_TOOL_CALL,
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
                IssueCode.INVALID_TOOL_CALL,
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
                IssueCode.INVALID_CONTENT_PART,
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
        add(
            IssueCode.MESSAGES_NOT_A_LIST,
            f'"{field}" must be a list of messages, not {json_type(messages)}.',
            field,
        )
        return None
    if not messages:
        add(
            IssueCode.EMPTY_MESSAGES,
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
                IssueCode.MESSAGE_NOT_AN_OBJECT,
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
                IssueCode.MISSING_ROLE,
                f'Message {i} has no "{shape.role_key}"; use one of {shape.role_names()}.',
                f"{path}.{shape.role_key}",
                i,
            )
            good, role_problem = False, True
        elif role is None:
            add(
                IssueCode.INVALID_ROLE,
                f"Message {i} has {shape.role_key} {show(raw_role)}; use one of {shape.role_names()}.",
                f"{path}.{shape.role_key}",
                i,
            )
            good, role_problem = False, True
        calls = None
        if shape.tool_calls and "tool_calls" in message:
            if role != "assistant":
                add(
                    IssueCode.INVALID_TOOL_CALL,
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
                add(IssueCode.MISSING_CONTENT, f'Message {i} has no "{shape.content_key}".', cpath, i)
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
                    add(IssueCode.EMPTY_CONTENT, f"Message {i} content is empty.", cpath, i)
                    good = False
        elif not isinstance(content, str):
            add(
                IssueCode.CONTENT_NOT_A_STRING,
                f"Message {i} content must be a string, not {json_type(content)}.",
                cpath,
                i,
            )
            good = False
        elif not content.strip() and not calls:
            add(IssueCode.EMPTY_CONTENT, f"Message {i} content is empty.", cpath, i)
            good = False
        else:
            characters += len(content)
        weight = message.get("weight")
        if "weight" in message and (
            isinstance(weight, bool) or not isinstance(weight, int | float) or weight not in (0, 1)
        ):
            add(
                IssueCode.INVALID_WEIGHT,
                f"Message {i} weight is {show(weight)}; it must be 0 (do not train on this message) or 1.",
                f"{path}.weight",
                i,
            )
            good = False
        unknown_keys(message, shape.keys, add, f"{path}.", i)
        if not good:
            ok = False
            continue
        entry: dict[str, Any] = {"role": role, "content": content}
        if "weight" in message and weight is not None:
            entry["weight"] = int(weight)
        if calls:
            entry["tool_calls"] = calls
        items.append(entry)
    if role_problem:
        return None
    if require_assistant and not any(m["role"] == "assistant" for m in items) and ok:
        add(
            IssueCode.MISSING_ASSISTANT_TURN,
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
                IssueCode.SYSTEM_NOT_FIRST,
                f"Message {i} is a system message; only the first message may be one.",
                f"{field}[{i}].role",
                i,
            )
            ok = False
        elif role == "tool" and (
            previous is None or not (previous["role"] == "tool" or previous.get("tool_calls"))
        ):
            add(
                IssueCode.TOOL_WITHOUT_CALL,
                f"Message {i} is a tool result, but the message before it is not an "
                "assistant tool call (or another tool result).",
                f"{field}[{i}].role",
                i,
            )
            ok = False
        elif previous is not None and role in ("user", "assistant") and previous["role"] == role:
            add(
                IssueCode.ROLES_NOT_ALTERNATING,
                f"Messages {i - 1} and {i} are both {role} messages; user and "
                "assistant turns must alternate (merge them into one).",
                f"{field}[{i}].role",
                i,
            )
            ok = False
        previous = m
    return ok


def last_assistant_text(items: list[dict[str, Any]]) -> str | None:
    for m in reversed(items):
        if m["role"] == "assistant":
            return m["content"] if isinstance(m["content"], str) else None
    return None


def no_trainable_turn(items: list[dict[str, Any]], add: IssueSink, field: str) -> None:
    if not any(m.get("weight", 1) for m in items if m["role"] == "assistant"):
        add(
            IssueCode.NO_TRAINABLE_TURN,
            "Every assistant message has weight 0, so training learns nothing from this example.",
            field,
            severity=Severity.WARNING,
        )


def image_paths(obj: dict[str, Any], add: IssueSink, image_parts: int) -> tuple[str, ...] | None:
    """The example's "images" list: paths (ZIP uploads) matching its {"type": "image"} parts in number."""
    raw = obj.get("images", [])
    if not isinstance(raw, list) or not all(isinstance(p, str) and p for p in raw):
        add(IssueCode.WRONG_TYPE, '"images" must be a list of image paths inside the ZIP.', "images")
        return None
    if len(raw) != image_parts:
        add(
            IssueCode.INVALID_CONTENT_PART,
            f'The example lists {len(raw)} image(s) in "images" but has {image_parts} '
            '{"type": "image"} content part(s); they must match one to one, in order.',
            "images",
        )
        return None
    return tuple(raw)
