"""Hypothesis strategies for any request message of the three services, from their descriptors.

Generic values exercise every field with its type's edges; a few fields get strategies that reach
further in: task keys that are mostly valid (so requests get past the key check), and pod
documents that follow the Pod schema with mutations (unknown fields, wrong types, values the
policy forbids) or are plainly hostile (deep nesting, aliases, tags, bombs).
"""

from __future__ import annotations

import json
import re
from typing import Any

import yaml
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

from services.launcher import podschema

F = FieldDescriptor
_INTS = {
    F.TYPE_INT32: (-(2**31), 2**31 - 1),
    F.TYPE_SINT32: (-(2**31), 2**31 - 1),
    F.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    F.TYPE_INT64: (-(2**63), 2**63 - 1),
    F.TYPE_SINT64: (-(2**63), 2**63 - 1),
    F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1),
    F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1),
    F.TYPE_FIXED64: (0, 2**64 - 1),
}
_ODD_TEXT = [
    "",
    " ",
    "\x00",
    "\n",
    "a" * 300,
    "-1",
    "%s%n",
    "../../etc/passwd",
    "💥",
    "default",
    "x,y=z",
    "\u202e",
]
TEXT = st.one_of(
    st.text(max_size=20),
    st.sampled_from(_ODD_TEXT),
    st.text(alphabet="abc-_.0123456789", min_size=1, max_size=12),
    st.text(min_size=250, max_size=1200),
)
ID = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-.", min_size=1, max_size=16)
_EXECUTOR_ID = re.compile(r"^[a-z0-9]([a-z0-9-]{0,40}[a-z0-9])?$")

# ---- pod documents ----------------------------------------------------------------------------

_POLICY_BAIT: dict[str, list[Any]] = {
    "privileged": [True],
    "hostNetwork": [True],
    "hostPID": [True],
    "hostIPC": [True],
    "automountServiceAccountToken": [True],
    "serviceAccountName": ["reconciler", "launcher", "default", "shepherd-worker"],
    "runAsUser": [0],
    "runAsNonRoot": [False],
    "allowPrivilegeEscalation": [True],
    "namespace": ["shepherd", "shepherd", "kube-system", "Not_A_Name"],
    "type": ["Unconfined", "RuntimeDefault", "Localhost"],
    "add": [["SYS_ADMIN"], ["NET_BIND_SERVICE"]],
    "drop": [["ALL"], []],
    "procMount": ["Unmasked"],
    "command": [["sh", "-c", "id"], ["run-task"], []],
    "args": [["sh"], ["run-task"], []],
}
_TYPOS = st.sampled_from(["nodeSelectr", "contaners", "imagePullPolicie", "securityContex", "<<", "x-y"])


def _scalar(kind: podschema.Scalar) -> st.SearchStrategy[Any]:
    wrong = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8), st.just([]))
    right: st.SearchStrategy[Any]
    if kind is podschema.Scalar.STRING:
        right = st.text(alphabet="abcz-./:019", max_size=12)
    elif kind is podschema.Scalar.BOOL:
        right = st.booleans()
    elif kind is podschema.Scalar.INT32:
        right = st.integers(-(2**31) - 1, 2**31)
    elif kind is podschema.Scalar.INT64:
        right = st.integers(-(2**64), 2**64)
    elif kind is podschema.Scalar.QUANTITY:
        right = st.one_of(st.sampled_from(["100m", "1Gi", "2", "0.5", "1e3", "lots", "-1"]), st.integers())
    else:
        right = st.one_of(st.integers(0, 70000), st.text(max_size=6))
    return st.one_of(right, right, right, wrong)


def _from_schema(schema: podschema.Schema, depth: int = 0) -> st.SearchStrategy[Any]:
    if isinstance(schema, podschema.Scalar):
        return _scalar(schema)
    if depth > 8:
        return st.none()
    if isinstance(schema, podschema.ListOf):
        return st.lists(_from_schema(schema.item, depth + 1), max_size=3)
    if isinstance(schema, podschema.MapOf):
        return st.dictionaries(
            st.text(alphabet="abc./-", max_size=6), _from_schema(schema.value, depth + 1), max_size=3
        )
    fields = schema.fields

    def build(names: list[str]) -> st.SearchStrategy[dict[str, Any]]:
        values = {}
        for name in names:
            strategy = (
                _from_schema(fields[name], depth + 1) if name in fields else _scalar(podschema.Scalar.STRING)
            )
            if name in _POLICY_BAIT:
                strategy = st.one_of(strategy, st.sampled_from(_POLICY_BAIT[name]))
            strategy = st.one_of(strategy, strategy, strategy, st.none())  # null: unset
            values[name] = strategy
        return st.fixed_dictionaries(values)

    known = st.sampled_from(sorted(fields))
    names = st.lists(st.one_of(*[known] * 12, _TYPOS), max_size=4, unique=True)
    if "name" in fields and schema.kind in ("Container", "Volume"):
        names = names.map(lambda n: ["name", *[x for x in n if x != "name"]])
    return names.flatmap(build)


_BASE = st.fixed_dictionaries(
    {"name": st.sampled_from(["base", "base", "side", "init-x", "Bad Name"])},
    optional={
        "image": st.sampled_from(["busybox", ""]),
        "command": st.sampled_from(_POLICY_BAIT["command"]),
        "args": st.lists(st.text(max_size=6), max_size=3),
        "securityContext": _from_schema(podschema.SECURITY_CONTEXT, 3),
    },
)
POD_DOCS = st.one_of(
    _from_schema(podschema.POD),
    st.fixed_dictionaries(
        {"spec": st.fixed_dictionaries({}, optional={"containers": st.lists(_BASE, max_size=2)})}
    ),
)
_HOSTILE = [
    "[" * 30000 + "]" * 30000,
    "{" * 30000,
    "{a: " * 2000 + "1" + "}" * 2000,
    "- " * 5000 + "x",
    'a: &a ["lol","lol","lol"]\nb: &b [*a,*a,*a]\nc: [*b,*b,*b]\n',
    "spec: &s {a: *s}",
    "spec: {nodeSelector: !!set {a, b}}",
    "spec: {containers: [{name: base, args: !!binary aGVsbG8=}]}",
    "spec: !!python/object/apply:os.system [id]",
    "spec: {activeDeadlineSeconds: 99999999999999999999999999999999}",
    "metadata: {annotations: [1, 2]}",
    "spec: {containers: [null]}",
    "a: 1\n---\nb: 2\n",
    "%YAML 1.1\n---\nkind: Pod\n",
    "a: " + "1:" * 20000 + "1",
    "<<: {spec: {hostNetwork: true}}",
    "spec:\n\tcontainers: []",
    "\ufeffkind: Pod",
    "kind: Pod\x85",
]


def _render(doc: Any, how: int) -> str:
    if how == 0:
        return json.dumps(doc)
    if how == 1:
        return yaml.safe_dump(doc, default_flow_style=True, width=10_000)
    return yaml.safe_dump(doc)


POD_TEXT = st.one_of(
    st.tuples(POD_DOCS, st.integers(0, 2)).map(lambda t: _render(*t)),
    st.tuples(POD_DOCS, st.integers(0, 2)).map(lambda t: _render(*t)),
    st.sampled_from(_HOSTILE),
    st.tuples(st.sampled_from(["&a ", "*a ", "!!str ", "!tag ", "? ", "---\n", "- "]), POD_DOCS).map(
        lambda t: t[0] + _render(t[1], 1)
    ),
    st.text(max_size=60),
    st.just(""),
)

# ---- messages ---------------------------------------------------------------------------------


def _key() -> st.SearchStrategy[Message]:
    from shepherd.v1 import task_pb2

    valid = st.builds(
        task_pb2.TaskKey,
        dag_id=ID,
        task_id=ID,
        run_id=ID,
        try_number=st.integers(1, 3),
        map_index=st.integers(-1, 2),
    )
    return st.one_of(valid, valid, valid, _message(task_pb2.TaskKey.DESCRIPTOR, 3))


def _executor_ids() -> st.SearchStrategy[list[str]]:
    """Never the id of a live executor: a valid-looking id is put under a prefix no one uses."""
    return st.lists(TEXT.map(lambda s: f"nobody-{s}"[:42] if _EXECUTOR_ID.match(s) else s), max_size=4)


_SPECIAL: dict[str, Any] = {
    "shepherd.v1.LaunchTaskRequest.template_yaml": lambda: st.one_of(st.just(""), st.just(""), POD_TEXT),
    "shepherd.v1.LaunchTaskRequest.pod_override_yaml": lambda: POD_TEXT,
    "shepherd.v1.LaunchTaskRequest.template_name": lambda: st.one_of(
        st.sampled_from(["", "default", "nope"]), TEXT
    ),
    "shepherd.v1.LaunchTaskRequest.command": lambda: st.one_of(
        st.lists(st.sampled_from(["run-task", "python", "-m", "x"]), min_size=1, max_size=4),
        st.lists(TEXT, max_size=5),
    ),
    "shepherd.v1.BatchLaunchTasksRequest.requests": lambda: st.lists(
        _message(_launch_descriptor(), 1), max_size=6
    ),
    "shepherd.v1.AdoptTasksRequest.dead_executor_ids": _executor_ids,
    "shepherd.v1.GetTaskLogsRequest.follow": lambda: st.just(False),
}


def _launch_descriptor() -> Descriptor:
    from shepherd.v1 import launcher_service_pb2

    return launcher_service_pb2.LaunchTaskRequest.DESCRIPTOR


def _field(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    special = _SPECIAL.get(field.full_name)
    if special is not None:
        return special()  # type: ignore[no-any-return]
    if (kind := field.message_type) is not None:
        if kind.GetOptions().map_entry:
            key_field, value_field = kind.fields
            return st.dictionaries(_single(key_field, depth), _single(value_field, depth), max_size=3)
        if kind.full_name == "shepherd.v1.TaskKey":
            item = _key()
        elif depth >= 3:
            return st.nothing()
        else:
            item = _message(kind, depth + 1)
    else:
        item = _single(field, depth)
    if field.is_repeated:
        return st.lists(item, max_size=4)
    return item


def _single(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if field.type in _INTS:
        low, high = _INTS[field.type]
        return st.one_of(st.integers(low, high), st.sampled_from([low, high, 0, 1, -1 if low else 2]))
    if field.type == F.TYPE_STRING:
        return TEXT
    if field.type == F.TYPE_BYTES:
        return st.binary(max_size=32)
    if field.type == F.TYPE_BOOL:
        return st.booleans()
    if field.type == F.TYPE_ENUM:
        return st.integers(-3, 12)
    if field.type in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        return st.floats(width=32 if field.type == F.TYPE_FLOAT else 64)
    if field.message_type is not None:
        return _message(field.message_type, depth + 1)
    raise AssertionError(f"no strategy for {field.full_name}")


def _message(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    cls = message_factory.GetMessageClass(descriptor)
    optional = {f.name: _field(f, depth) for f in descriptor.fields}
    optional = {name: strategy for name, strategy in optional.items() if not strategy.is_empty}
    return st.fixed_dictionaries({}, optional=optional).map(lambda values: cls(**values))


def requests(descriptor: Descriptor) -> st.SearchStrategy[Message]:
    """Request messages of one RPC's input type."""
    return _message(descriptor)
