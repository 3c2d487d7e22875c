"""Reading a YAML or JSON document that a caller sent, in bounded time and memory.

A full YAML loader trusts its input: it expands aliases (a few hundred bytes can stand for
gigabytes), recurses once per nesting level (deep enough nesting crashes the process inside
libyaml's composer), and builds whatever a tag asks for (`!!binary`, `!!set`). Here the parser's
events are composed into plain JSON-shaped values by a loop with its own stack, which stops at the
first anchor, alias or explicit tag, at a nesting depth beyond what any pod needs, at a node
budget, and at a duplicate key. The parser itself (libyaml when PyYAML has it) produces events
lazily, so a hostile document is refused as soon as it crosses a limit, before the rest is read.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml import events
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.nodes import ScalarNode
from yaml.resolver import Resolver

from shepherd.validation import InvalidField

MAX_DEPTH = 32  # a v1 Pod nests about 12 deep (affinity terms); 32 leaves room and stops bombs
MAX_NODES = 20_000  # scalars, mappings and sequences together
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when PyYAML was built with it
_RESOLVER = Resolver()
_CONSTRUCTOR = SafeConstructor()
_MAX_NUMBER_LEN = 64
_KEEP_TEXT = {"tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:merge", "tag:yaml.org,2002:value"}


def load(text: str, field: str, *, max_bytes: int) -> Any:
    """The single document in `text` as dicts, lists, str, int, float, bool and None.

    INVALID_ARGUMENT naming `field` (and the path inside the document) when it is not valid YAML or
    JSON, or when it uses anchors, aliases or tags, repeats a key, nests deeper than MAX_DEPTH or
    holds more than MAX_NODES nodes."""
    if len(text) > max_bytes or len(text.encode(errors="replace")) > max_bytes:
        raise InvalidField(field, f"must be at most {max_bytes} bytes")
    try:
        return _compose(yaml.parse(text, Loader=_Loader), field)
    except InvalidField:
        raise
    except yaml.MarkedYAMLError as err:
        where = err.problem_mark
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        raise InvalidField(field, f"is not valid YAML or JSON{at}: {err.problem or err}") from None
    except (yaml.YAMLError, ValueError) as err:  # ValueError: e.g. text the reader cannot encode
        raise InvalidField(field, f"is not valid YAML or JSON: {err}") from None


class _Frame:
    """A mapping or sequence being composed, with the key its next value belongs to."""

    __slots__ = ("key", "value")

    def __init__(self, value: dict[str, Any] | list[Any]) -> None:
        self.value = value
        self.key: str | None = None


def _compose(stream: Any, field: str) -> Any:
    stack: list[_Frame] = []
    root: Any = None
    documents = nodes = 0

    def fail(problem: str) -> InvalidField:
        return InvalidField(_path(field, stack), problem)

    def attach(value: Any) -> None:
        nonlocal root
        if not stack:
            root = value
            return
        top = stack[-1]
        if isinstance(top.value, list):
            top.value.append(value)
        else:
            assert top.key is not None
            top.value[top.key] = value
            top.key = None

    for event in stream:
        if isinstance(event, events.DocumentStartEvent):
            documents += 1
            if documents > 1:
                raise InvalidField(field, "must hold one YAML document, not several")
            continue
        if isinstance(event, (events.StreamStartEvent, events.StreamEndEvent, events.DocumentEndEvent)):
            continue
        if isinstance(event, (events.MappingEndEvent, events.SequenceEndEvent)):
            attach(stack.pop().value)
            continue
        if isinstance(event, events.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise fail("YAML anchors and aliases are not accepted: write the value out")
        if getattr(event, "tag", None) is not None:
            raise fail(f"YAML tags ({event.tag}) are not accepted: quote the value to make it a string")
        nodes += 1
        if nodes > MAX_NODES:
            raise InvalidField(field, f"must hold at most {MAX_NODES} values")
        top = stack[-1] if stack else None
        expecting_key = top is not None and isinstance(top.value, dict) and top.key is None
        if isinstance(event, events.ScalarEvent):
            if expecting_key:
                assert top is not None
                assert isinstance(top.value, dict)
                if event.value in top.value:
                    top.key = event.value
                    raise fail("is given twice")
                top.key = event.value
            else:
                attach(_scalar(event, fail))
            continue
        if expecting_key:
            raise fail("mapping keys must be strings, not mappings or lists")
        if len(stack) >= MAX_DEPTH:
            raise fail(f"nests deeper than {MAX_DEPTH} levels")
        stack.append(_Frame({} if isinstance(event, events.MappingStartEvent) else []))
    return root


def _scalar(event: events.ScalarEvent, fail: Any) -> Any:
    """A plain scalar resolves as YAML 1.1 says (null, bool, int, float); a quoted one is a string."""
    if not event.implicit[0]:
        return event.value
    tag = _RESOLVER.resolve(ScalarNode, event.value, (True, False))  # type: ignore[no-untyped-call]
    if tag == "tag:yaml.org,2002:str" or tag in _KEEP_TEXT:
        return event.value
    if len(event.value) > _MAX_NUMBER_LEN and tag != "tag:yaml.org,2002:null":
        # Long sexagesimal or digit strings cost quadratic time to convert, and fit no pod field.
        raise fail(f"{event.value[:40]!r}... is too long for a number (at most {_MAX_NUMBER_LEN} characters)")
    node = ScalarNode(tag, event.value)
    try:
        if tag == "tag:yaml.org,2002:null":
            return None
        if tag == "tag:yaml.org,2002:bool":
            return _CONSTRUCTOR.construct_yaml_bool(node)
        if tag == "tag:yaml.org,2002:int":
            return _CONSTRUCTOR.construct_yaml_int(node)
        if tag == "tag:yaml.org,2002:float":
            return _CONSTRUCTOR.construct_yaml_float(node)
    except (ValueError, ConstructorError) as err:  # e.g. an integer of more digits than Python parses
        raise fail(f"{event.value[:40]!r} is not a usable number: {err}") from None
    return event.value


def _path(field: str, stack: list[_Frame]) -> str:
    """Where in the document the composer stands, e.g. `pod_override_yaml.spec.containers[0].args`."""
    path = field
    for frame in stack:
        if isinstance(frame.value, list):
            path += f"[{len(frame.value)}]"
        elif frame.key is not None:
            path += f".{frame.key if len(frame.key) <= 64 else frame.key[:61] + '...'}"
    return path
