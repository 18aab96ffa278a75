"""The dashboard's trigger form, generated from a workflow's input schema; pure.

A workflow's input model gives a JSON Schema (``model_json_schema()``). Each
top-level property becomes a field whose kind fits its type: text, a number, a
checkbox, a choice of an enum's values, or JSON text for anything nested. A
workflow without an input model gets one JSON field for the whole input.

The submitted form is read back into the input (:func:`read`); values that do
not parse are passed on as typed, so the workflow's own model is the one judge
of what is valid and its errors come back by field (:func:`errors_by_field`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["FORM_ERROR", "PREFIX", "WHOLE_INPUT", "Field", "errors_by_field", "fields_of", "read"]

PREFIX = "f."  # form names of input fields, apart from the form's own (csrf, idempotency key)
WHOLE_INPUT = "input"  # the one field of a workflow without an input schema
FORM_ERROR = ""  # errors_by_field's key of an error that names no field


@dataclass(frozen=True)
class Field:
    """One input of the form: ``kind`` is text, integer, number, checkbox, select or json."""

    name: str
    kind: str
    required: bool
    label: str
    description: str = ""
    choices: tuple[str, ...] = ()
    default: str = ""
    json_choices: bool = False  # the enum's values are not all strings: choices are JSON

    @property
    def form_name(self) -> str:
        return PREFIX + self.name


def fields_of(schema: Mapping[str, Any] | None) -> list[Field]:
    """The fields of an input schema (None: one JSON field for the whole input)."""
    if not schema or schema.get("type") != "object" or "properties" not in schema:
        return [Field(WHOLE_INPUT, "json", False, "Input (JSON)",
                      "The workflow declares no input model: any JSON value.")]
    required = set(schema.get("required", ()))
    defs = schema.get("$defs", {})
    return [_field(name, prop, name in required, defs)
            for name, prop in schema["properties"].items()]


def _field(name: str, prop: Mapping[str, Any], required: bool,
           defs: Mapping[str, Any]) -> Field:
    options = [o for o in prop.get("anyOf", ()) if o.get("type") != "null"]
    nullable = len(options) < len(prop.get("anyOf", ()))
    target = _resolve(options[0] if len(options) == 1 else prop, defs)
    kind = _kind(target)
    default = prop.get("default")
    enum = target.get("enum", ())
    return Field(
        name=name, kind=kind, required=required and not nullable,
        label=name, description=str(prop.get("description", "")),
        choices=tuple(_text(v) for v in enum),
        json_choices=not all(isinstance(v, str) for v in enum),
        default="" if default is None else _text(default) if kind != "json" else json.dumps(
            default),
    )


def _resolve(prop: Mapping[str, Any], defs: Mapping[str, Any]) -> Mapping[str, Any]:
    ref = prop.get("$ref", "")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        found = defs.get(ref.removeprefix("#/$defs/"))
        if isinstance(found, Mapping):
            return found
    return prop


def _kind(prop: Mapping[str, Any]) -> str:
    if "enum" in prop:
        return "select"
    return {"string": "text", "integer": "integer", "number": "number",
            "boolean": "checkbox"}.get(str(prop.get("type")), "json")


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def read(fields: list[Field], form: Mapping[str, str]) -> tuple[Any, dict[str, str]]:
    """The input a submitted form describes, and the fields it could not read (by name).

    An empty optional field is left out, so the model's default applies.
    """
    if len(fields) == 1 and fields[0].name == WHOLE_INPUT:
        return _read_json(fields[0], form.get(fields[0].form_name, ""))
    data: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for field in fields:
        raw = form.get(field.form_name, "")
        if field.kind == "checkbox":
            data[field.name] = field.form_name in form
            continue
        if raw == "" and not field.required:
            continue
        if field.kind == "json":
            value, problems = _read_json(field, raw)
            errors.update(problems)
        else:
            value = _typed(field, raw)
        data[field.name] = value
    return data, errors


def _read_json(field: Field, raw: str) -> tuple[Any, dict[str, str]]:
    if not raw.strip():
        return None, {}
    try:
        return json.loads(raw), {}
    except ValueError as exc:
        return None, {field.name: f"not valid JSON: {exc}"}


def _typed(field: Field, raw: str) -> Any:
    """The text of a field as its type; as typed when it does not parse (the model says why)."""
    try:
        if field.kind == "integer":
            return int(raw)
        if field.kind == "number":
            return float(raw)
        if field.kind == "select" and field.json_choices:
            return json.loads(raw)
    except ValueError:
        return raw
    return raw


def errors_by_field(errors: list[dict[str, Any]], fields: list[Field]) -> dict[str, str]:
    """Pydantic's errors of the input, by the top-level field they are about."""
    names = {f.name for f in fields}
    found: dict[str, str] = {}
    for error in errors:
        loc = [str(p) for p in error.get("loc", ())]
        name = loc[0] if loc and loc[0] in names else FORM_ERROR
        where = ".".join(loc[1:]) if name != FORM_ERROR else ".".join(loc)
        message = f"{where}: {error.get('msg')}" if where else str(error.get("msg"))
        found[name] = f"{found[name]}; {message}" if name in found else message
    return found
