"""Small proto helpers shared by the converters of every service."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp


def to_timestamp(value: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value if value.tzinfo else value.replace(tzinfo=UTC))
    return ts


def from_timestamp(ts: Timestamp) -> datetime:
    return ts.ToDatetime(tzinfo=UTC)


def as_utc(value: datetime) -> datetime:
    """SQLite hands datetimes back naive; everything TuneForge stores is UTC."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


NUL, REPLACEMENT = "\x00", "\ufffd"


def replace_nul(message: Message) -> int:
    """Every NUL character in the message's strings (nested messages, repeated fields and maps, their keys
    too) replaced by U+FFFD, in place; returns how many strings changed. PostgreSQL's text cannot hold a
    NUL: a worker's message carrying one (an exception's text, a log line) failed its transaction on every
    redelivery. Proto strings are otherwise valid UTF-8 already (a parse refuses anything else)."""
    changed = 0
    for field, value in message.ListFields():
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            changed += _replace_nul_in_map(field, value)
        elif field.type == FieldDescriptor.TYPE_STRING:
            if field.is_repeated:
                for i, item in enumerate(value):
                    if NUL in item:
                        value[i] = item.replace(NUL, REPLACEMENT)
                        changed += 1
            elif NUL in value:
                setattr(message, field.name, value.replace(NUL, REPLACEMENT))
                changed += 1
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            items = value if field.is_repeated else [value]
            changed += sum(replace_nul(item) for item in items)
    return changed


def _replace_nul_in_map(field: FieldDescriptor, mapping: Any) -> int:
    entry = field.message_type
    assert entry is not None  # a map field's type is its entry message
    key_field, value_field = entry.fields_by_name["key"], entry.fields_by_name["value"]
    changed = 0
    if value_field.type == FieldDescriptor.TYPE_MESSAGE:
        changed += sum(replace_nul(item) for item in mapping.values())
    elif value_field.type == FieldDescriptor.TYPE_STRING:
        for key in list(mapping):
            if NUL in mapping[key]:
                mapping[key] = mapping[key].replace(NUL, REPLACEMENT)
                changed += 1
    if key_field.type == FieldDescriptor.TYPE_STRING:
        for key in [k for k in mapping if NUL in k]:
            clean = key.replace(NUL, REPLACEMENT)
            if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                mapping[clean].CopyFrom(mapping[key])
            else:
                mapping[clean] = mapping[key]
            del mapping[key]
            changed += 1
    return changed


def find_nul(message: Message, prefix: str = "") -> str | None:
    """The path of the first string of the message (nested messages, repeated fields and maps, their keys
    too) that holds a NUL character, e.g. "spec.labels[team]" or "messages[2].content"; None when none
    does."""
    for field, value in message.ListFields():
        path = f"{prefix}{field.name}"
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            for key, item in value.items():
                where = f"{path}[{key}]".replace(NUL, "\\x00")  # the path is quoted in an error message
                if isinstance(key, str) and NUL in key:
                    return where
                if value_field.type == FieldDescriptor.TYPE_STRING and NUL in item:
                    return where
                if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                    found = find_nul(item, f"{where}.")
                    if found:
                        return found
        elif field.type == FieldDescriptor.TYPE_STRING:
            if field.is_repeated:
                for i, item in enumerate(value):
                    if NUL in item:
                        return f"{path}[{i}]"
            elif NUL in value:
                return path
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.is_repeated:
                for i, item in enumerate(value):
                    found = find_nul(item, f"{path}[{i}].")
                    if found:
                        return found
            else:
                found = find_nul(value, f"{path}.")
                if found:
                    return found
    return None
