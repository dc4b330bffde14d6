"""Protobuf messages as plain data and back, generic over their descriptors.

`message_to_dict` and `fill_message` know no BlockPress message: `runtime/convert.py` builds the
domain conversions (requests, events, records) on them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

__all__ = ["fill_message", "is_repeated", "message_to_dict"]


def is_repeated(field: FieldDescriptor) -> bool:
    """Whether `field` is a repeated field, on every protobuf release pyproject allows."""
    # protobuf 7 dropped `label`; 5.x (the oldest release pyproject allows) lacks `is_repeated`.
    return field.is_repeated if hasattr(field, "is_repeated") else field.label == FieldDescriptor.LABEL_REPEATED


def message_to_dict(msg: Message) -> dict[str, Any]:
    """A message as plain data keyed by proto field names, with Python numbers.

    Fields without presence appear with their defaults, as in `MessageToDict(...,
    always_print_fields_with_no_presence=True)`; unset messages, optional fields and oneof members are
    left out; an enum gives its value's name.
    """
    out: dict[str, Any] = {}
    for field in msg.DESCRIPTOR.fields:
        value = getattr(msg, field.name)
        if is_repeated(field):
            out[field.name] = [_value(field, v) for v in value]
        elif not field.has_presence or msg.HasField(field.name):
            out[field.name] = _value(field, value)
    return out


def fill_message(data: Mapping[str, Any], out: Message) -> None:
    """Sets `out`'s fields from plain data keyed by field names, ignoring unknown keys and None.

    `json_format.ParseDict` does the same through the JSON mapping and cost ~60 us for a `completed`
    event, on the path of every event a stream sends; this walks the descriptor directly (~10 us).
    A value of the wrong kind (an older writer's float in an int field) goes through ParseDict after
    all, so what that accepts is still accepted.
    """
    try:
        _fill(data, out)
    except (TypeError, ValueError, KeyError, AttributeError):
        out.Clear()
        json_format.ParseDict(data, out, ignore_unknown_fields=True)


def _fill(data: Mapping[str, Any], out: Message) -> None:
    fields = out.DESCRIPTOR.fields_by_name
    for key, value in data.items():
        field = fields.get(key)
        if field is None or value is None:
            continue
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.message_type.GetOptions().map_entry:
                raise TypeError("map fields go through ParseDict")
            if is_repeated(field):
                for item in value:
                    _fill(item, getattr(out, key).add())
            else:
                _fill(value, getattr(out, key))
        elif field.type == FieldDescriptor.TYPE_ENUM:
            numbers = [v if isinstance(v, int) else field.enum_type.values_by_name[v].number for v in
                       (value if is_repeated(field) else [value])]  # fmt: skip
            if is_repeated(field):
                getattr(out, key).extend(numbers)
            else:
                setattr(out, key, numbers[0])
        elif is_repeated(field):
            getattr(out, key).extend(value)
        else:
            setattr(out, key, value)


def _value(field: FieldDescriptor, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return message_to_dict(value)
    if field.type == FieldDescriptor.TYPE_ENUM:
        return field.enum_type.values_by_number[value].name
    return value
