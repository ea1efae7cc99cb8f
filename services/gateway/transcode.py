"""HTTP request -> request message, and messages -> canonical proto3 JSON.

The request message is built in the order google/api/http.proto gives: the body (the whole message for
`body: "*"`, or one field), then the query parameters (fields the path and the body did not bind), then the
path variables, which win. JSON input accepts both the lowerCamelCase and the original snake_case names.

Every mistake in the input is a `BadInput` carrying one (field, description) pair per problem, so the caller
answers 400 with a google.rpc.BadRequest naming the field: unknown fields, JSON that does not parse, a value
of the wrong type, an enum name that does not exist, a repeated query parameter for a single field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl

from google.protobuf import json_format, message
from google.protobuf.descriptor import FieldDescriptor

# Well-known message types that have a string form in JSON (and so in a query parameter).
_STRING_MESSAGES = {"google.protobuf.Timestamp", "google.protobuf.Duration", "google.protobuf.FieldMask"}
_FORMS = {"google.protobuf.Timestamp": "an RFC 3339 time such as 2026-01-31T00:00:00Z",
          "google.protobuf.Duration": "a duration in seconds such as 3600s",
          "google.protobuf.FieldMask": "a comma-separated list of field names"}
_WRAPPERS = {f"google.protobuf.{n}Value" for n in
             ("Double", "Float", "Int64", "UInt64", "Int32", "UInt32", "Bool", "String", "Bytes")}
# The deepest JSON body read, counting arrays and objects: protobuf's own default recursion limit
# (json_format's max_recursion_depth), far past any request message's nesting. Deeper input is refused
# before json_format or the field checks see it (they recurse); Python's JSON decoder gives up near 1000.
MAX_JSON_DEPTH = 100


class BadInput(ValueError):
    """The request cannot become a message; `violations` are (field, description) pairs, answered with
    `http_status` (400, or e.g. 415 for a body that is not JSON)."""

    def __init__(self, violations: list[tuple[str, str]], *, http_status: int = 400) -> None:
        self.violations = violations
        self.http_status = http_status
        super().__init__("; ".join(f"{f}: {d}" if f else d for f, d in violations))


def _field_by_any_name(msg: Any, name: str) -> FieldDescriptor | None:
    f = msg.fields_by_name.get(name)
    if f is not None:
        return f
    for candidate in msg.fields:
        if candidate.json_name == name:
            return candidate
    return None


def _known(msg: Any) -> str:
    names = [f.json_name for f in msg.fields]
    return ", ".join(names[:30]) + (", ..." if len(names) > 30 else "") if names else "none"


def _is_map(f: FieldDescriptor) -> bool:
    return (f.message_type is not None and f.message_type.GetOptions().map_entry)


def _repeated(f: FieldDescriptor) -> bool:
    return bool(f.is_repeated)


def check_unknown_fields(msg: Any, value: Any, path: str = "") -> list[tuple[str, str]]:
    """Fields of `value` (decoded JSON) that `msg` does not have, at any depth, with the names it has."""
    if not isinstance(value, dict) or msg.full_name.startswith("google.protobuf."):
        return []
    problems: list[tuple[str, str]] = []
    for key, item in value.items():
        where = f"{path}.{key}" if path else str(key)
        f = _field_by_any_name(msg, key)
        if f is None:
            problems.append((where, f"unknown field of {msg.full_name} (its fields: {_known(msg)})"))
            continue
        if f.enum_type is not None and item is not None:
            for i, element in enumerate(item if _repeated(f) and isinstance(item, list) else [item]):
                problem = _enum_problem(f, element)
                if problem:
                    problems.append((f"{where}[{i}]" if _repeated(f) else where, problem))
            continue
        if f.message_type is None or item is None:
            continue
        if _is_map(f):
            value_field = f.message_type.fields_by_name["value"]
            if value_field.message_type is not None and isinstance(item, dict):
                for k, v in item.items():
                    problems += check_unknown_fields(value_field.message_type, v, f"{where}[{k}]")
        elif _repeated(f) and isinstance(item, list):
            for i, element in enumerate(item):
                problems += check_unknown_fields(f.message_type, element, f"{where}[{i}]")
        else:
            problems += check_unknown_fields(f.message_type, item, where)
    return problems


_FAILED_FIELD = re.compile(r"Failed to parse (\w+) field: ")
_AT_PATH = re.compile(r' at "?[A-Za-z0-9_]+((?:\.[A-Za-z0-9_]+|\[[^\]]*\])*)"?\.?$')


def _explain(error: json_format.ParseError, prefix: str) -> tuple[str, str]:
    """(field path, reason) from one of json_format's messages, which nest 'Failed to parse x field: '."""
    text = str(error).split("\n", 1)[0]
    names = _FAILED_FIELD.findall(text)
    reason = _FAILED_FIELD.sub("", text)
    at = _AT_PATH.search(reason)
    path = ".".join(names)
    if at is not None:
        reason = reason[:at.start()]
        located = at.group(1).lstrip(".")
        if located and len(located) >= len(path):
            path = located
    path = ".".join(p for p in (prefix, path) if p)
    return path, reason.rstrip(".") or "cannot be parsed"


NOT_UTF8 = "is not UTF-8 text (once percent-decoded)"


def is_utf8(text: str) -> bool:
    """Whether `text`, decoded with errors="surrogateescape" (as aiohttp reads the request line and
    `rules.PathTemplate.match` percent-decodes), came from UTF-8: other bytes became lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def shown(text: str) -> str:
    """`text` fit to name in an error: bytes that were not UTF-8 shown as U+FFFD."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def check_query_utf8(raw_query: str) -> None:
    """Raises BadInput naming each query parameter whose name or value is not UTF-8 once decoded
    (aiohttp's `request.query` would have replaced those bytes with U+FFFD)."""
    bad = [name for name, value in parse_qsl(raw_query, keep_blank_values=True, errors="surrogateescape")
           if not (is_utf8(name) and is_utf8(value))]
    if bad:
        raise BadInput([(shown(name), NOT_UTF8) for name in dict.fromkeys(bad)])


def _too_deep(prefix: str) -> BadInput:
    return BadInput([(prefix or "body", f"is nested too deeply: at most {MAX_JSON_DEPTH} levels of JSON "
                                        "arrays and objects")])


def _depth_over(value: Any, limit: int) -> bool:
    """Whether decoded JSON `value` nests arrays and objects more than `limit` deep (without recursing)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def parse_json_into(target: message.Message, raw: bytes, *, prefix: str = "") -> None:
    """Merges the JSON object `raw` into `target`, or raises BadInput naming the field."""
    if not raw.strip():
        return
    try:
        value = json.loads(raw)
    except UnicodeDecodeError:
        raise BadInput([(prefix or "body", "is not UTF-8 text")]) from None
    except json.JSONDecodeError as exc:
        raise BadInput([(prefix or "body", f"is not valid JSON: {exc.msg} at line {exc.lineno} "
                                           f"column {exc.colno}")]) from None
    except RecursionError:  # the decoder's own limit, near 1000 levels
        raise _too_deep(prefix) from None
    parse_value_into(target, value, prefix=prefix)


def parse_value_into(target: message.Message, value: Any, *, prefix: str = "") -> None:
    """Merges decoded JSON `value` into `target`, or raises BadInput naming the field."""
    if _depth_over(value, MAX_JSON_DEPTH):
        raise _too_deep(prefix)
    desc = target.DESCRIPTOR
    if not isinstance(value, dict) and desc.full_name not in _STRING_MESSAGES | _WRAPPERS:
        raise BadInput([(prefix or "body", f"must be a JSON object ({desc.full_name}), not "
                                           f"{type(value).__name__}")])
    unknown = check_unknown_fields(desc, value)
    if unknown:
        raise BadInput([(f"{prefix}.{f}" if prefix else f, d) for f, d in unknown])
    try:
        json_format.ParseDict(value, target)
    except json_format.ParseError as exc:
        if "Message too deep" in str(exc):  # json_format's max_recursion_depth, past ours
            raise _too_deep(prefix) from None
        raise BadInput([_explain(exc, prefix)]) from None
    except RecursionError:
        raise _too_deep(prefix) from None
    except (TypeError, ValueError, AttributeError) as exc:  # odd values json_format does not wrap
        raise BadInput([(prefix or "body", f"cannot be read as {desc.full_name}: {exc}")]) from None


def _resolve(msg: Any, dotted: str) -> list[FieldDescriptor] | str:
    """The fields along a query parameter's dotted path, or a sentence saying why it names no field."""
    chain: list[FieldDescriptor] = []
    current = msg
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        f = _field_by_any_name(current, part)
        if f is None:
            return f"unknown field of {current.full_name} (its fields: {_known(current)})"
        chain.append(f)
        last = i == len(parts) - 1
        if f.message_type is None:
            if not last:
                return f"'{part}' is not a message, so it has no field '{parts[i + 1]}'"
            continue
        if _is_map(f):
            return "map fields cannot be given as query parameters; send them in a JSON body"
        if f.message_type.full_name in _STRING_MESSAGES | _WRAPPERS:
            if not last:
                return f"'{part}' is a {f.message_type.full_name}; give it as one value"
            continue
        if _repeated(f):
            return "repeated message fields cannot be given as query parameters"
        if last:
            return (f"'{part}' is a message ({f.message_type.full_name}); give its fields as "
                    f"'{dotted}.<field>'")
        current = f.message_type
    return chain


def _enum_problem(f: FieldDescriptor, value: Any) -> str:
    """Why `value` is not one of the enum's values (by name or number), or ""."""
    enum = f.enum_type
    assert enum is not None
    if isinstance(value, str) and value in enum.values_by_name:
        return ""
    if isinstance(value, int) and not isinstance(value, bool) and value in enum.values_by_number:
        return ""
    if isinstance(value, str) and value.lstrip("-").isdigit() and int(value) in enum.values_by_number:
        return ""
    names = [v.name for v in enum.values if not v.name.endswith("_UNSPECIFIED")]
    return f"{json.dumps(value)} is not a {enum.name}; one of: {', '.join(names)}"


def _query_value(f: FieldDescriptor, raw: str) -> Any:
    """A query string value as the JSON value json_format expects for `f`."""
    if f.enum_type is not None:
        problem = _enum_problem(f, raw)
        if problem:
            raise BadInput([("", problem)])
        return raw
    if f.type == FieldDescriptor.TYPE_BOOL:
        lowered = raw.lower()
        if lowered in ("true", "1", ""):
            return True
        if lowered in ("false", "0"):
            return False
        raise BadInput([("", f"'{raw}' is not a boolean (true or false)")])
    if f.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return raw  # json_format parses numbers given as strings, NaN and Infinity included
    if f.message_type is not None and f.message_type.full_name == "google.protobuf.BoolValue":
        return _query_value(f.message_type.fields_by_name["value"], raw)
    return raw  # strings, bytes (base64), integers as strings, enum names or numbers, timestamps, ...


def apply_query(target: message.Message, query: Mapping[str, list[str]], *,
                skip: frozenset[str] = frozenset()) -> None:
    """Sets the fields named by query parameters (dotted paths for nested fields; a repeated field takes
    the parameter several times or comma-free repeats), or raises BadInput naming every bad one."""
    violations: list[tuple[str, str]] = []
    merged: dict[str, Any] = {}
    for name, values in query.items():
        if name in skip:
            continue
        chain = _resolve(target.DESCRIPTOR, name)
        if isinstance(chain, str):
            violations.append((name, chain))
            continue
        leaf = chain[-1]
        try:
            converted = [_query_value(leaf, v) for v in values]
        except BadInput as exc:
            violations.append((name, exc.violations[0][1]))
            continue
        if _repeated(leaf):
            item: Any = converted
        elif len(converted) > 1:
            violations.append((name, f"given {len(converted)} times; it takes one value"))
            continue
        else:
            item = converted[0]
        nested: dict[str, Any] = {leaf.json_name: item}
        for f in reversed(chain[:-1]):
            nested = {f.json_name: nested}
        # Each parameter alone first, so a bad value is reported under its own name.
        try:
            json_format.ParseDict(nested, type(target)())
        except json_format.ParseError as exc:
            reason = _explain(exc, "")[1]
            form = _FORMS.get(leaf.message_type.full_name if leaf.message_type is not None else "")
            violations.append((name, f"{values[0]!r} is not {form} ({reason})" if form else reason))
            continue
        _deep_merge(merged, nested)
    if violations:
        raise BadInput(violations)
    scratch = type(target)()
    json_format.ParseDict(merged, scratch)
    _merge_replacing(target, scratch, merged)


def _deep_merge(into: dict[str, Any], other: dict[str, Any]) -> None:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = value


def _merge_replacing(target: message.Message, source: message.Message, given: dict[str, Any]) -> None:
    """Copies the fields named in `given` from `source` into `target`, replacing (not appending)."""
    for key, value in given.items():
        f = _field_by_any_name(target.DESCRIPTOR, key)
        assert f is not None
        if f.message_type is not None and isinstance(value, dict) and \
                f.message_type.full_name not in _STRING_MESSAGES | _WRAPPERS:
            _merge_replacing(getattr(target, f.name), getattr(source, f.name), value)
        elif _repeated(f):
            target.ClearField(f.name)
            getattr(target, f.name).extend(getattr(source, f.name))
        elif f.message_type is not None:
            getattr(target, f.name).CopyFrom(getattr(source, f.name))
        else:
            setattr(target, f.name, getattr(source, f.name))


def set_path_field(target: message.Message, dotted: str, value: str) -> None:
    """Sets the (string) field a path variable binds, or raises BadInput naming it."""
    if not is_utf8(value):
        raise BadInput([(dotted, NOT_UTF8)])
    *parents, leaf = dotted.split(".")
    current = target
    for part in parents:
        current = getattr(current, part)
    f = current.DESCRIPTOR.fields_by_name[leaf]
    if f.type == FieldDescriptor.TYPE_STRING:
        setattr(current, leaf, value)
        return
    scratch = type(current)()
    try:
        json_format.ParseDict({f.json_name: value}, scratch)
    except json_format.ParseError as exc:
        raise BadInput([(dotted, _explain(exc, "")[1])]) from None
    setattr(current, leaf, getattr(scratch, leaf))


def to_json_bytes(msg: message.Message) -> bytes:
    """Canonical proto3 JSON: lowerCamelCase names, int64 as strings, enums by name, default values
    omitted (read an absent field as its default, as proto3 JSON says)."""
    return json_format.MessageToJson(msg, indent=None, ensure_ascii=False).encode()


def to_dict(msg: message.Message) -> dict[str, Any]:
    return json_format.MessageToDict(msg)
