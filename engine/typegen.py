"""``ploy types``: the source of ``ploy_env.py``, which types ``ctx.env``'s bindings.

The counterpart of the seed's ``env.d.ts``. For ploy.yaml's bindings it writes::

    class OrderInputDict(TypedDict):
        order_id: str
        amount: float

    class PloyEnv(Protocol):
        ORDER_FLOW: WorkflowBinding[worker.OrderInput | OrderInputDict, worker.OrderOutput]

so ``await env.ORDER_FLOW.trigger({"order_id": 1})`` is flagged by a type
checker, as is a model of the wrong class. A binding whose workflow has no
input model stays ``WorkflowBinding[Any, Any]``.

Each TypedDict mirrors its model's fields as pydantic validates a dict: keys
are the fields' aliases, a field with a default is ``NotRequired``, a nested
model is the model or its own TypedDict, lists and dicts are ``Sequence`` and
``Mapping`` (pydantic accepts a tuple for a list). A type the generator cannot
spell (a custom class, a datetime that pydantic would also parse from a
string) is ``Any``: the check is never stricter than validation, except that
pydantic's lax mode also turns ``"1"`` into an int.
"""

from __future__ import annotations

import enum
import json
import keyword
import sys
import types
import typing
from collections import abc
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from engine.builder import Worker
from engine.config import Config
from engine.errors import CommandError

__all__ = ["render_env_module"]

_PRIMITIVES: dict[Any, str] = {str: "str", int: "int", float: "float", bool: "bool",
                               bytes: "bytes", type(None): "None", None: "None", Any: "Any"}
# get_origin() of list[X], List[X] and Sequence[X] alike: the runtime class.
_SEQUENCES = (list, tuple, set, frozenset, abc.Sequence, abc.Set, abc.MutableSequence)
_MAPPINGS = (dict, abc.Mapping, abc.MutableMapping)


class _Module:
    """What the generated module needs: imports, and a TypedDict per input model."""

    def __init__(self, main_file: Path):
        self.main_file = main_file
        self.imports: set[str] = set()  # modules of the user's models (type checking only)
        self.typing: set[str] = {"Protocol"}
        self.abc: set[str] = set()
        self.dicts: dict[type[BaseModel], str] = {}
        self.sources: list[str] = []

    def model_ref(self, model: type) -> str:
        """``module.Qualname`` of a model (or enum), importable by name."""
        module = model.__module__
        loaded = sys.modules.get(module)
        file = getattr(loaded, "__file__", None)
        if file is not None and Path(file).resolve() == self.main_file:
            module = self.main_file.stem  # load_worker imports main under a private name
        where = f"model {model.__qualname__} of {module}"
        if not all(part.isidentifier() for part in module.split(".")) or module == "__main__":
            raise CommandError(
                f"{where}: the module cannot be imported by name (rename {self.main_file.name}?)")
        if "<locals>" in model.__qualname__:
            raise CommandError(f"{where}: a model defined inside a function cannot be imported")
        self.imports.add(module)
        return f"{module}.{model.__qualname__}"

    def input_type(self, model: type[BaseModel]) -> str:
        """``module.Model | ModelDict``: what ``trigger`` and a nested field accept."""
        return f"{self.model_ref(model)} | {self.typed_dict(model)}"

    def typed_dict(self, model: type[BaseModel]) -> str:
        """The name of ``model``'s TypedDict, generating it (and its nested ones) once."""
        if model in self.dicts:
            return self.dicts[model]
        name = f"{model.__name__}Dict"
        taken = set(self.dicts.values())
        n = 2
        while name in taken:
            name, n = f"{model.__name__}Dict{n}", n + 1
        self.dicts[model] = name  # before the fields: a model may refer to itself
        self.typing.add("TypedDict")
        ref = self.model_ref(model)
        fields: list[tuple[str, str]] = []
        for field_name, info in model.model_fields.items():
            alias = info.validation_alias if isinstance(info.validation_alias, str) else None
            key = alias or info.alias or field_name
            spelled = self.annotation(info.annotation)
            if not info.is_required():
                self.typing.add("NotRequired")
                spelled = f"NotRequired[{spelled}]"
            fields.append((key, spelled))
        if all(k.isidentifier() and not keyword.iskeyword(k) for k, _ in fields):
            body = "".join(f"    {k}: {t}\n" for k, t in fields)
            head = f'class {name}(TypedDict):\n    """The dict form of {ref}."""\n'
            self.sources.append(head + (f"\n{body}" if body else ""))
        else:  # a key that is not a Python name: the functional form, types as strings
            items = "".join(f"    {_literal(k)}: {_literal(t)},\n" for k, t in fields)
            self.sources.append(f'{name} = TypedDict("{name}", {{\n{items}}})\n'
                                f'"""The dict form of {ref}."""\n')
        return name

    def annotation(self, tp: Any) -> str:
        """``tp`` spelled for the generated module; ``Any`` when it cannot be."""
        primitive = next((name for t, name in _PRIMITIVES.items() if tp is t), None)
        if primitive is not None:
            return primitive
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            return self.input_type(tp)
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            return self.enum(tp)
        origin, args = typing.get_origin(tp) or tp, typing.get_args(tp)
        if origin is typing.Annotated:
            return self.annotation(args[0])
        if origin is typing.Union or origin is types.UnionType:
            spelled = list(dict.fromkeys(self.annotation(a) for a in args))
            return "Any" if "Any" in spelled else " | ".join(spelled)
        if origin is typing.Literal and all(isinstance(a, str | int | bool) for a in args):
            self.typing.add("Literal")
            return f"Literal[{', '.join(map(_literal, args))}]"
        if origin in _SEQUENCES:
            fixed = origin is tuple and len(set(args) - {...}) != 1  # tuple[int, str]
            self.abc.add("Sequence")
            return f"Sequence[{self.annotation(Any if fixed or not args else args[0])}]"
        if origin in _MAPPINGS:
            key, value = args if len(args) == 2 else (Any, Any)
            self.abc.add("Mapping")
            return f"Mapping[{self.annotation(key)}, {self.annotation(value)}]"
        return "Any"

    def enum(self, tp: type[enum.Enum]) -> str:
        """``module.Enum | Literal[its values]``: pydantic takes a member or its value."""
        values = [member.value for member in tp]
        if not values or not all(isinstance(v, str | int) for v in values):
            return "Any"
        self.typing.add("Literal")
        return f"{self.model_ref(tp)} | Literal[{', '.join(map(_literal, values))}]"


def render_env_module(worker: Worker, config: Config) -> str:
    """The source of ploy_env.py: ``class PloyEnv(Protocol)`` with one typed binding each.

    Models are referenced through their module (``worker.OrderInput``), so two
    models of one name cannot clash; the user's main file is imported by its
    stem. The imports are for type checkers only, so the worker may import
    ploy_env at run time without an import cycle.

    Raises:
        CommandError: A model whose module cannot be imported by name.
    """
    out = _Module((config.root / config.main).resolve())
    fields = []
    for binding, target in sorted(config.workflow.items()):
        wf = worker.workflow(target.name)
        input_type = output_type = "Any"
        if wf is not None and wf.input is not None:
            input_type = out.input_type(wf.input)
        if wf is not None and wf.output is not None:
            output_type = out.model_ref(wf.output)
        fields.append(f"    {binding}: WorkflowBinding[{input_type}, {output_type}]\n"
                      f'    """ploy.yaml binding {binding} -> workflow {target.name!r}."""\n')
    protocol = ('class PloyEnv(Protocol):\n'
                '    """``ctx.env``: the workflow bindings of ploy.yaml."""\n\n'
                '    async def send_event(self, type: str, data: Any = None, *, id: str | None '
                '= None,\n'
                '                         source: str | None = None) -> str: ...\n')
    body = "\n\n".join([*out.sources, protocol]) + "\n" + "\n".join(fields)
    out.typing.add("Any")  # send_event's data
    if out.imports:
        out.typing.add("TYPE_CHECKING")
    head = [
        f'"""Typed bindings of {config.path.name if config.path else "ploy.yaml"} '
        "for ``ctx.env``.\n",
        "Generated by `ploy types`; do not edit. Run it again after changing ploy.yaml",
        'or a workflow\'s input or output model.\n"""\n',
        "from __future__ import annotations\n",
    ]
    if out.abc:
        head.append(f"from collections.abc import {', '.join(sorted(out.abc))}")
    head.append(f"from typing import {', '.join(sorted(out.typing, key=_import_order))}\n")
    if fields:
        head.append("from engine import WorkflowBinding\n")
    if out.imports:
        head.append("if TYPE_CHECKING:\n" +
                    "".join(f"    import {m}\n" for m in sorted(out.imports)))
    names = ["PloyEnv", *out.dicts.values()]
    listed = ", ".join(f'"{n}"' for n in sorted(names))
    head.append(f"__all__ = [{listed}]\n")
    return ("\n".join(head) + "\n\n" + body).rstrip("\n") + "\n"


def _literal(value: str | int) -> str:
    """A Python literal in double quotes, as ruff format writes it."""
    return json.dumps(value, ensure_ascii=False) if isinstance(value, str) else repr(value)


def _import_order(name: str) -> tuple[bool, str]:
    """isort's order: CONSTANTS first, then the rest case-sensitively."""
    return (not name.isupper(), name)
