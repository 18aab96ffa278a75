"""Avro single-object encoding of events, every schema version readable.

Wire format (Avro spec, "Single object encoding"): the two bytes ``C3 01``,
the 8-byte little-endian CRC-64-AVRO fingerprint of the writer schema's
parsing canonical form, then the Avro binary body. Because every record names
its writer schema, a schema change only adds ``schemas/event.vN.avsc``: the
newest version writes, and every version found in ``schemas/`` stays readable.

Encoding and decoding are the hot path (every step appends and folds events,
a rebuild decodes the whole log), so each schema version is compiled once into
plain Python closures: a writer for the newest version, a reader per version.
The compiler walks the schema and knows exactly the Avro the event schemas use
(records, unions, null, boolean, int, long, string); a version using anything
else is encoded and decoded with fastavro instead. Either way the bytes are the
same: the unit tests compare the compiled writer and readers with fastavro.
Decoding is stricter than fastavro: bytes after the record, a union index out of
range, a boolean byte other than 0 or 1 and a varint past 64 bits are CodecErrors.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Callable
from functools import cache
from operator import attrgetter
from pathlib import Path
from typing import Any, cast

from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import fingerprint, to_parsing_canonical_form

from engine.errors import CodecError
from engine.events import BODY_TYPES, Event

MAGIC = b"\xc3\x01"
HEADER_LEN = 10
_NAMESPACE = "dev.ploy.events."

Writer = Callable[[Any, bytearray], None]
"""Appends the Avro binary of a value to the buffer."""
Reader = Callable[[bytes, int], tuple[Any, int]]
"""Reads a value at an offset: the value and the offset after it."""


def schema_dir() -> Path:
    """Where the .avsc files are: the repo's ``schemas/`` or the wheel's copy."""
    repo = Path(__file__).resolve().parent.parent / "schemas"
    return repo if repo.is_dir() else Path(__file__).resolve().parent / "schemas"


class Codec:
    """Encodes with the newest schema; decodes any known version by fingerprint."""

    def __init__(self, directory: Path | None = None):
        files = sorted((directory or schema_dir()).glob("event.v*.avsc"), key=_version)
        if not files:
            raise CodecError(f"no event schemas (event.vN.avsc) in {directory or schema_dir()}")
        self.readers: dict[bytes, Any] = {}
        self.versions: dict[bytes, int] = {}
        self._decoders: dict[bytes, Reader] = {}
        for path in files:
            parsed = parse_schema(json.loads(path.read_text()))
            fp = bytes.fromhex(fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO"))
            self.readers[fp] = parsed
            self.versions[fp] = _version(path)
            reader = compile_reader(parsed)
            self._decoders[fp] = reader or _fastavro_reader(parsed)
        self.writer = parsed
        self.writer_fingerprint = fp
        self._header = MAGIC + fp
        self.compiled_writer: Writer | None = compile_writer(parsed)
        self._write = self.compiled_writer or _fastavro_writer(parsed)

    def encode(self, event: Event) -> bytes:
        """The single-object encoding of ``event`` under the newest schema."""
        out = bytearray(self._header)
        self._write(event, out)
        return bytes(out)

    def decode(self, data: bytes) -> Event:
        """The event in ``data``; CodecError names what is wrong with the bytes."""
        if type(data) is not bytes:
            data = bytes(data)
        if len(data) < HEADER_LEN or data[:2] != MAGIC:
            start = data[:2].hex() or "empty"
            raise CodecError(f"not an Avro single-object record (starts {start})")
        reader = self._decoders.get(data[2:HEADER_LEN])
        if reader is None:
            raise CodecError(f"unknown schema fingerprint {data[2:HEADER_LEN].hex()}")
        try:
            event, end = reader(data, HEADER_LEN)
        except CodecError:
            raise
        except Exception as exc:  # garbage input raises many types; name it
            raise CodecError(f"undecodable Avro body: {type(exc).__name__}: {exc}") from exc
        if end != len(data):
            raise CodecError(
                f"undecodable Avro body: {len(data) - end} trailing byte(s) after the record"
            )
        return event  # type: ignore[no-any-return]


def _version(path: Path) -> int:
    return int(path.name.split(".")[1].lstrip("v"))


@cache
def default_codec() -> Codec:
    """One codec per process over the shipped schemas."""
    return Codec()


# -- the fastavro path: schema versions the compiler does not handle -------------------------


def _fastavro_writer(schema: Any) -> Writer:
    def write(event: Event, out: bytearray) -> None:
        record = {
            "event_id": event.event_id,
            "execution_id": event.execution_id,
            "workflow": event.workflow,
            "timestamp": event.timestamp,
            "epoch": event.epoch,
            "body": (_NAMESPACE + event.body.NAME, vars(event.body)),
        }
        buf = io.BytesIO()
        schemaless_writer(buf, schema, record)
        out += buf.getvalue()

    return write


def _fastavro_reader(schema: Any) -> Reader:
    def read(data: bytes, pos: int) -> tuple[Any, int]:
        buf = io.BytesIO(data)
        buf.seek(pos)
        record: Any = schemaless_reader(buf, schema, None, return_record_name=True)
        name, body = record["body"]
        cls = BODY_TYPES[name.rsplit(".", 1)[-1]]
        event = Event(
            execution_id=record["execution_id"],
            workflow=record["workflow"],
            timestamp=record["timestamp"],
            epoch=record["epoch"],
            event_id=record["event_id"],
            body=cls(**body),
        )
        return event, buf.tell()

    return read


# -- the compiler ----------------------------------------------------------------------------


class UnsupportedSchema(Exception):
    """The schema uses Avro the compiler does not handle: that version goes through fastavro."""


def compile_writer(schema: Any) -> Writer | None:
    """A writer of events under ``schema`` (parsed), or None when only fastavro can write it."""
    try:
        return _Compiler().record_writer(_top_record(schema), top=True)
    except UnsupportedSchema:
        return None


def compile_reader(schema: Any) -> Reader | None:
    """A reader of events under ``schema`` (parsed), or None when only fastavro can read it."""
    try:
        return _Compiler().record_reader(_top_record(schema), top=True)
    except UnsupportedSchema:
        return None


def _top_record(schema: Any) -> Any:
    if _kind(schema) != "record":
        raise UnsupportedSchema("the event schema is not a record")
    return schema


_LONG_MIN, _LONG_MAX = -(1 << 63), (1 << 63) - 1
_INT_MIN, _INT_MAX = -(1 << 31), (1 << 31) - 1
_new = object.__new__

# How the record loops handle a field. One loop per record reads or writes all its fields,
# with the common kinds inline: a Python call per field costs more than the field itself.
# In order of frequency: the loops test them in this order.
_STRING, _LONG, _OPTIONAL_STRING, _UNION, _BOOLEAN, _OPTIONAL, _CALL = range(7)
_INLINE = {"string": _STRING, "int": _LONG, "long": _LONG, "boolean": _BOOLEAN}

# What a compiled reader does for a field of each kind (see ``_Compiler.record_reader``):
# ``{v}`` is the local the value goes to, ``{arg}`` what ``field_reader`` gave the kind.
# Readers raise IndexError when the bytes run out, ValueError on bytes no writer produces.
_STRING_SOURCE = """\
n = data[pos]
if n < 0x80:
    pos += 1
else:
    n, pos = _read_varint(data, pos)
if n & 1:
    raise ValueError(f"negative length {{(n >> 1) ^ -1}}")
end = pos + (n >> 1)
if end > size:
    raise EOFError(f"Expected {{n >> 1}} bytes, read {{size - pos}}")
{v} = data[pos:end].decode()
pos = end
"""
_READ_SOURCE: dict[int, str] = {
    _STRING: _STRING_SOURCE,
    _LONG: """\
n = data[pos]
pos += 1
if n > 0x7F:
    n &= 0x7F
    shift = 7
    while True:
        b = data[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        if b < 0x80:
            break
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")
    if n >> 64:
        raise ValueError("varint longer than 64 bits")
{v} = (n >> 1) ^ -(n & 1)
""",
    _OPTIONAL_STRING: """\
b = data[pos]
if b == 2:
    pos += 1
    index = 1
elif b == 0:
    pos += 1
    index = 0
else:  # the index as a longer varint: odd, but valid
    index, pos = _read_union_index(data, pos, 2)
if index == 0:
    {v} = None
else:
""" + "".join(f"    {line}\n" for line in _STRING_SOURCE.splitlines()),
    _UNION: """\
b = data[pos]
if b & 0x81 or b >> 1 >= len({arg}):
    index, pos = _read_union_index(data, pos, len({arg}))
else:
    index = b >> 1
    pos += 1
{v}, pos = {arg}[index](data, pos)
""",
    _BOOLEAN: "{v}, pos = _read_boolean(data, pos)\n",
    _OPTIONAL: """\
index, pos = _read_union_index(data, pos, 2)
if index:
    {v}, pos = {arg}(data, pos)
else:
    {v} = None
""",
    _CALL: "{v}, pos = {arg}(data, pos)\n",
}


def _kind(schema: Any) -> str:
    """The Avro type of a (parsed) schema node: a primitive name, "record" or "union"."""
    if isinstance(schema, list):
        return "union"
    if isinstance(schema, dict):
        if "logicalType" in schema:
            raise UnsupportedSchema(f"logical type {schema['logicalType']}")
        schema = schema.get("type")
    if schema in ("null", "boolean", "int", "long", "string", "record"):
        return str(schema)
    raise UnsupportedSchema(f"type {schema!r}")


def _varint(n: int) -> bytes:
    """The varint of a non-negative (already zig-zagged) int: 7 bits a byte, low first."""
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _zigzag(value: int) -> bytes:
    return _varint((value << 1) ^ (value >> 63))


# Primitives one at a time: union branches other than ["null", T]. An int is written as
# a long is (as fastavro does); a string is its UTF-8 length, then the UTF-8.


def _write_null(value: Any, out: bytearray) -> None:
    pass


def _write_boolean(value: Any, out: bytearray) -> None:
    out.append(1 if value else 0)


def _write_long(value: int, out: bytearray) -> None:
    if -64 <= value < 64:
        out.append((value << 1) ^ (value >> 63))
    else:
        _write_big_long(value, out)


def _write_big_long(value: int, out: bytearray) -> None:
    if not _LONG_MIN <= value <= _LONG_MAX:
        raise OverflowError(f"{value} does not fit an Avro long")
    n = (value << 1) ^ (value >> 63)
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _write_string(value: str, out: bytearray) -> None:
    try:
        raw = value.encode()
    except AttributeError:
        raise TypeError(f"must be string, not {type(value).__name__}") from None
    except UnicodeEncodeError:  # a lone surrogate: write its escape, never fail
        raw = value.encode("utf-8", "backslashreplace")
    n = len(raw)
    if n < 64:
        out.append(n << 1)
    else:
        out += _varint(n << 1)
    out += raw


# Readers raise IndexError when the bytes run out, ValueError on bytes no writer produces.


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """A varint of at most 64 bits (still zig-zagged)."""
    n = shift = 0
    while True:
        b = data[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        if b < 0x80:
            break
        shift += 7
        if shift >= 70:
            raise ValueError("varint longer than 10 bytes")
    if n >> 64:
        raise ValueError("varint longer than 64 bits")
    return n, pos


def _read_null(data: bytes, pos: int) -> tuple[None, int]:
    return None, pos


def _read_boolean(data: bytes, pos: int) -> tuple[bool, int]:
    b = data[pos]
    if b > 1:
        raise ValueError(f"boolean byte {b:#04x}")
    return b == 1, pos + 1


def _read_long(data: bytes, pos: int) -> tuple[int, int]:
    n = data[pos]
    if n < 0x80:
        pos += 1
    else:
        n, pos = _read_varint(data, pos)
    return (n >> 1) ^ -(n & 1), pos


def _read_string(data: bytes, pos: int) -> tuple[str, int]:
    n = data[pos]
    if n < 0x80:
        pos += 1
    else:
        n, pos = _read_varint(data, pos)
    if n & 1:
        raise ValueError(f"negative length {(n >> 1) ^ -1}")
    end = pos + (n >> 1)
    if end > len(data):
        raise EOFError(f"Expected {n >> 1} bytes, read {len(data) - pos}")
    return data[pos:end].decode(), end


def _read_union_index(data: bytes, pos: int, count: int) -> tuple[int, int]:
    index, pos = _read_long(data, pos)
    if not 0 <= index < count:
        raise ValueError(f"union index {index} of {count} branches")
    return index, pos


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_PRIMITIVE_WRITERS: dict[str, Writer] = {
    "null": _write_null,
    "boolean": _write_boolean,
    "int": _write_long,
    "long": _write_long,
    "string": _write_string,
}
_PRIMITIVE_READERS: dict[str, Reader] = {
    "null": _read_null,
    "boolean": _read_boolean,
    "int": _read_long,
    "long": _read_long,
    "string": _read_string,
}
# Which union branch a value takes, as fastavro decides it.
_PRIMITIVE_MATCHES: dict[str, Callable[[Any], bool]] = {
    "null": lambda v: v is None,
    "boolean": lambda v: isinstance(v, bool),
    "int": lambda v: _is_int(v) and _INT_MIN <= v <= _INT_MAX,
    "long": lambda v: _is_int(v) and _LONG_MIN <= v <= _LONG_MAX,
    "string": lambda v: isinstance(v, str),
}


@dataclasses.dataclass(frozen=True)
class _Binding:
    """The class a record reads into and writes from, and how their fields map."""

    cls: type
    names: list[str]  # the record's fields, schema order
    members: list[str]  # the class's fields, class order
    fast: bool  # build instances without __init__: a plain dataclass, every field in the record
    extras: list[str]  # record fields the class lacks, dropped on read (the envelope only)


class _Compiler:
    """Turns a parsed schema into closures; UnsupportedSchema where it cannot."""

    def bind(self, schema: dict[str, Any], top: bool) -> _Binding:
        """The envelope record is Event; a record in a union is the body type of its name."""
        cls: type | None = Event if top else BODY_TYPES.get(schema["name"].rsplit(".", 1)[-1])
        if cls is None or not dataclasses.is_dataclass(cls):
            raise UnsupportedSchema(f"no event class for record {schema['name']}")
        fields = dataclasses.fields(cls)
        members = [f.name for f in fields]
        names = [f["name"] for f in schema["fields"]]
        extras = [n for n in names if n not in members] if top else []
        fast = (
            set(names) - set(extras) == set(members)
            and all(f.init for f in fields)
            and not hasattr(cls, "__post_init__")
            and not hasattr(cls, "__slots__")
            and cls.__new__ is object.__new__
        )
        return _Binding(cls, names, members, fast, extras)

    # writers

    def record_writer(self, schema: dict[str, Any], top: bool) -> Writer:  # noqa: C901
        binding = self.bind(schema, top)
        plan = [self.field_writer(f["type"]) for f in schema["fields"]]
        ops, args = [op for op, _ in plan], [arg for _, arg in plan]
        get = self.getter(schema, binding)

        def write_record(obj: Any, out: bytearray) -> None:  # noqa: C901
            # zip(strict=...) takes a slow call path: a zip a record costs 0.2 us more
            for op, arg, value in zip(ops, args, get(obj)):  # noqa: B905
                if op == _STRING:
                    try:
                        raw = value.encode()
                    except AttributeError:
                        raise TypeError(f"must be string, not {type(value).__name__}") from None
                    except UnicodeEncodeError:  # a lone surrogate: its escape, never fail
                        raw = value.encode("utf-8", "backslashreplace")
                    n = len(raw)
                    if n < 64:
                        out.append(n << 1)
                    else:
                        out += _varint(n << 1)
                    out += raw
                elif op == _LONG:
                    n = (value << 1) ^ (value >> 63)
                    if n >> 64:
                        raise OverflowError(f"{value} does not fit an Avro long")
                    while n > 0x7F:
                        out.append((n & 0x7F) | 0x80)
                        n >>= 7
                    out.append(n)
                elif op == _OPTIONAL_STRING:
                    if value is None:
                        out.append(0)
                        continue
                    try:
                        raw = value.encode()
                    except AttributeError:
                        raise ValueError(f"{value!r} is not null or a string") from None
                    except UnicodeEncodeError:  # a lone surrogate: its escape, never fail
                        raw = value.encode("utf-8", "backslashreplace")
                    n = len(raw)
                    if n < 64:
                        out.append(2)
                        out.append(n << 1)
                    else:
                        out.append(2)
                        out += _varint(n << 1)
                    out += raw
                elif op == _UNION:
                    hit = arg[0].get(type(value))
                    if hit is None:
                        arg[1](value, out)
                    else:
                        out += hit[0]
                        hit[1](value, out)
                elif op == _BOOLEAN:
                    out.append(1 if value else 0)
                elif op == _OPTIONAL:
                    if value is None:
                        out.append(0)
                    elif arg[0](value):
                        out.append(2)
                        arg[1](value, out)
                    else:
                        raise ValueError(f"{value!r} (type {type(value)}) is not in its union")
                else:
                    arg(value, out)

        return write_record

    def field_writer(self, schema: Any) -> tuple[int, Any]:
        """How the record loop writes a field: its kind and what that kind needs."""
        kind = _kind(schema)
        if kind in _INLINE:
            return _INLINE[kind], None
        if kind == "null":
            return _CALL, _write_null
        if kind == "record":
            raise UnsupportedSchema("a record outside a union")
        kinds = [_kind(branch) for branch in schema]
        if kinds == ["null", "string"]:
            return _OPTIONAL_STRING, None
        if len(kinds) == 2 and kinds[0] == "null" and kinds[1] in _INLINE:
            return _OPTIONAL, (_PRIMITIVE_MATCHES[kinds[1]], _PRIMITIVE_WRITERS[kinds[1]])
        by_class: dict[type, tuple[bytes, Writer]] = {}
        for index, branch in enumerate(schema):
            if _kind(branch) == "record":
                writer = self.record_writer(branch, top=False)
                by_class[self.bind(branch, top=False).cls] = (_zigzag(index), writer)
        return _UNION, (by_class, self.union_writer(schema, by_class))

    def union_writer(
        self, schema: list[Any], by_class: dict[type, tuple[bytes, Writer]]
    ) -> Writer:
        """Any union: the first branch the value matches, as fastavro chooses."""
        kinds = [_kind(branch) for branch in schema]
        if len(set(kinds) - {"record"}) + kinds.count("record") != len(kinds):
            raise UnsupportedSchema(f"a union of {kinds}")
        others = [
            (_PRIMITIVE_MATCHES[kind], _zigzag(index), _PRIMITIVE_WRITERS[kind])
            for index, kind in enumerate(kinds)
            if kind != "record"
        ]

        def write_union(value: Any, out: bytearray) -> None:
            hit = by_class.get(type(value))
            if hit is not None:
                out += hit[0]
                hit[1](value, out)
                return
            for matches, index, write in others:
                if matches(value):
                    out += index
                    write(value, out)
                    return
            raise ValueError(f"{value!r} (type {type(value)}) do not match {kinds}")

        return write_union

    def getter(self, schema: dict[str, Any], binding: _Binding) -> Callable[[Any], Any]:
        """The record's field values from an instance, in schema order; defaults for the
        fields the class lacks."""
        names = binding.names
        if all(n in binding.members for n in names):
            if len(names) > 1:
                return attrgetter(*names)
            if names:
                name = names[0]
                return lambda obj: (getattr(obj, name),)
        defaults: list[Any] = []
        for field in schema["fields"]:
            if field["name"] not in binding.members and "default" not in field:
                raise UnsupportedSchema(f"{field['name']} is not in {binding.cls.__name__}")
            defaults.append(field.get("default"))

        def get(obj: Any) -> tuple[Any, ...]:
            return tuple(getattr(obj, n, d) for n, d in zip(names, defaults, strict=True))

        return get

    # readers

    def record_reader(self, schema: dict[str, Any], top: bool) -> Reader:
        """A reader of the record as straight-line Python, compiled once.

        One function per record with every field's read written out (the common
        kinds inline, the rest a call): no loop over a plan and no test of which
        kind a field is at run time, which halves a decode. Fields are read into
        locals, then set on the instance in the class's field order, as
        ``__init__`` would; fields the class lacks (the envelope's extras) are read
        and dropped.
        """
        binding = self.bind(schema, top)
        env: dict[str, Any] = {
            "_cls": binding.cls, "_new": _new, "_read_varint": _read_varint,
            "_read_union_index": _read_union_index, "_read_boolean": _read_boolean,
        }
        body: list[str] = ["size = len(data)"]
        local: dict[str, str] = {}
        for i, field in enumerate(schema["fields"]):
            op, arg = self.field_reader(field["type"])
            target = local[field["name"]] = f"v{i}"
            env[f"arg{i}"] = arg
            body += _READ_SOURCE[op].format(v=target, arg=f"arg{i}").splitlines()
        kept = [n for n in binding.names if n not in binding.extras]
        if binding.fast:
            body += ["obj = _new(_cls)", "d = obj.__dict__"]
            body += [f"d[{name!r}] = {local[name]}" for name in binding.members]
        else:
            body.append("obj = _cls(" + ", ".join(f"{n}={local[n]}" for n in kept) + ")")
        body.append("return obj, pos")
        source = "def read_record(data, pos):\n" + "".join(f"    {line}\n" for line in body)
        exec(compile(source, f"<avro reader {schema['name']}>", "exec"), env)  # noqa: S102
        return cast(Reader, env["read_record"])

    def field_reader(self, schema: Any) -> tuple[int, Any]:
        """How the record loop reads a field: its kind and what that kind needs."""
        kind = _kind(schema)
        if kind in _INLINE:
            return _INLINE[kind], None
        if kind == "null":
            return _CALL, _read_null
        if kind == "record":
            raise UnsupportedSchema("a record outside a union")
        kinds = [_kind(branch) for branch in schema]
        if kinds == ["null", "string"]:
            return _OPTIONAL_STRING, None
        if len(kinds) == 2 and kinds[0] == "null" and kinds[1] in _INLINE:
            return _OPTIONAL, _PRIMITIVE_READERS[kinds[1]]
        branches = [
            self.record_reader(branch, top=False) if k == "record" else _PRIMITIVE_READERS[k]
            for branch, k in zip(schema, kinds, strict=True)
        ]
        return _UNION, branches
