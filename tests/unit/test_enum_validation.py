"""An enum field holding a number its enum does not define is refused, naming the field, wherever
it sits in a message: top level, nested, inside repeated fields. Proto3 enums are open, so without
this check such a number would pass through as if it meant something."""

from __future__ import annotations

import pytest
from google.protobuf.descriptor import Descriptor

from shepherd.v1 import reconciler_service_pb2, task_pb2, watcher_service_pb2
from shepherd.validation import InvalidField, check_enums
from tests.helpers.enums import SERVICE_FILES, enum_paths, every_rpc_enum_case, path_name, with_enum

# Message types with enums at every depth and inside repeated fields, beside the requests.
DEEP_TYPES = [
    reconciler_service_pb2.ListTasksRequest.DESCRIPTOR,
    reconciler_service_pb2.WatchTaskStatesResponse.DESCRIPTOR,
    watcher_service_pb2.PodEvent.DESCRIPTOR,
    task_pb2.Task.DESCRIPTOR,
]
CASES = [(t, p) for t in DEEP_TYPES for p in enum_paths(t)] + [
    (request, path) for *_, request, path in every_rpc_enum_case()
]


@pytest.mark.parametrize(
    ("message_type", "path"), CASES, ids=[f"{t.name}.{path_name(t, p)}" for t, p in CASES]
)
@pytest.mark.parametrize("number", [99, -5])
def test_an_undefined_enum_number_is_refused_naming_its_field(
    message_type: Descriptor, path: tuple[str, ...], number: int
) -> None:
    with pytest.raises(InvalidField) as err:
        check_enums(with_enum(message_type, path, number))
    assert err.value.field == path_name(message_type, path)
    assert str(number) in err.value.problem


@pytest.mark.parametrize(
    ("message_type", "path"), CASES, ids=[f"{t.name}.{path_name(t, p)}" for t, p in CASES]
)
def test_every_defined_enum_value_is_accepted(message_type: Descriptor, path: tuple[str, ...]) -> None:
    holder = message_type
    for name in path[:-1]:
        nested = holder.fields_by_name[name].message_type
        assert nested is not None
        holder = nested
    enum = holder.fields_by_name[path[-1]].enum_type
    assert enum is not None
    for value in enum.values:
        check_enums(with_enum(message_type, path, value.number))


def test_a_later_repeated_element_is_named_by_its_index() -> None:
    event = watcher_service_pb2.PodEvent(
        containers=[
            task_pb2.ContainerStatus(phase=task_pb2.CONTAINER_PHASE_RUNNING),
            task_pb2.ContainerStatus(phase=42),  # type: ignore[arg-type]  # the point of the test
        ]
    )
    with pytest.raises(InvalidField) as err:
        check_enums(event)
    assert err.value.field == "containers[1].phase"


def test_the_requests_of_every_service_are_walked() -> None:
    """The generic cases really reach the services' requests: at least ListTasksRequest.state."""
    names = {f"{request.name}.{path_name(request, path)}" for *_, request, path in every_rpc_enum_case()}
    assert "ListTasksRequest.state" in names
    assert len(SERVICE_FILES) == 3
