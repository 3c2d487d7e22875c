"""A template or override is read in bounded time and memory, and every bad one is refused by the
field it names: no crash, no alias expansion, no Python exception leaking out as UNKNOWN."""

from __future__ import annotations

import subprocess
import sys
import tracemalloc

import pytest

from services.launcher import podspec
from shepherd.validation import InvalidField

FIELD = "pod_override_yaml"
# The deep documents that crashed the launcher with SIGSEGV inside libpython.
DEEP = {
    "flow-lists": "'[' * 30000 + ']' * 30000",
    "flow-maps": "'{' * 30000",
    "nested-maps": "'{a: ' * 50000 + '1' + '}' * 50000",
    "block-lists": "'- ' * 50000 + 'x'",
}
# 653 bytes that stand for about 10^9 strings once aliases are expanded.
ALIAS_BOMB = (
    'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    "b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
    "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
    "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n"
    "e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n"
    "f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\n"
    "g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]\n"
    "h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]\n"
    "i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]\n"
    "spec: {containers: [{name: base, args: *i}]}\n"
)


@pytest.mark.parametrize("expression", DEEP.values(), ids=DEEP.keys())
def test_deep_nesting_is_refused_without_crashing(expression: str) -> None:
    """Run in a child process: on the unfixed code the parser takes the whole process down."""
    program = (
        "from services.launcher.podspec import parse_pod_document\n"
        "from shepherd.validation import InvalidField\n"
        "try:\n"
        f"    parse_pod_document({expression}, 'pod_override_yaml')\n"
        "except InvalidField as err:\n"
        "    print('refused', err.field)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"the parser died ({result.returncode}): {result.stderr[-500:]}"
    assert result.stdout.startswith(f"refused {FIELD}"), result.stdout


def test_an_alias_bomb_is_refused_before_it_is_expanded() -> None:
    tracemalloc.start()
    try:
        with pytest.raises(InvalidField) as err:
            podspec.parse_pod_document(ALIAS_BOMB, FIELD)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert err.value.field == f"{FIELD}.a"
    assert "aliases" in err.value.problem
    assert peak < 10 * 1024 * 1024


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("metadata: {annotations: [1, 2]}", f"{FIELD}.metadata.annotations"),
        ("metadata: {labels: {a: 1}}", f"{FIELD}.metadata.labels.a"),
        ("spec: {containers: [null]}", f"{FIELD}.spec.containers[0]"),
        ("spec: {containers: [{image: x}]}", f"{FIELD}.spec.containers[0].name"),
        ("spec: {containers: [{name: base, args: !!binary aGVsbG8=}]}", f"{FIELD}.spec.containers[0].args"),
        ("spec: {nodeSelector: !!set {a, b}}", f"{FIELD}.spec.nodeSelector"),
        (
            "spec: {activeDeadlineSeconds: 99999999999999999999999999999999}",
            f"{FIELD}.spec.activeDeadlineSeconds",
        ),
        ("spec: {activeDeadlineSeconds: '10'}", f"{FIELD}.spec.activeDeadlineSeconds"),
        ("spec: {priority: 3000000000}", f"{FIELD}.spec.priority"),
        ("spec: &s {a: *s}", f"{FIELD}.spec"),
        ("spec: {nodeSelectr: {pool: batch}}", f"{FIELD}.spec.nodeSelectr"),
        (
            "spec: {containers: [{name: base, imagePullPolicy: Always, tty: 'yes'}]}",
            f"{FIELD}.spec.containers[base].tty",
        ),
        (
            "spec: {containers: [{name: base, securityContext: {privilegd: true}}]}",
            f"{FIELD}.spec.containers[base].securityContext.privilegd",
        ),
        ("spec: {ephemeralContainers: []}", f"{FIELD}.spec.ephemeralContainers"),
        ("status: {phase: Running}", f"{FIELD}.status"),
        (
            "spec: {volumes: [{name: v, gcePersistentDisk: {pdName: x}}]}",
            f"{FIELD}.spec.volumes[v].gcePersistentDisk",
        ),
        (
            "spec: {containers: [{name: base, resources: {limits: {cpu: lots}}}]}",
            f"{FIELD}.spec.containers[base].resources.limits.cpu",
        ),
        ("metadata: {labels: {a: b}, labels: {c: d}}", f"{FIELD}.metadata.labels"),
        ("{[a]: 1}", FIELD),
        ("a: 1\n---\nb: 2\n", FIELD),
        ("spec: {containers: [{name: base, args: ['" + "1:" * 5000 + "']}]}", None),
        (
            "spec: {terminationGracePeriodSeconds: " + "1:" * 5000 + "1}",
            f"{FIELD}.spec.terminationGracePeriodSeconds",
        ),
        ("spec: {containers: [{name: base, args: [\ud800]}]}", FIELD),
    ],
)
def test_a_malformed_document_names_its_field(text: str, field: str | None) -> None:
    if field is None:  # a long quoted string is just a string
        podspec.parse_pod_document(text, FIELD)
        return
    with pytest.raises(InvalidField) as err:
        podspec.parse_pod_document(text, FIELD)
    assert err.value.field == field, err.value


def test_a_near_miss_suggests_the_field_meant() -> None:
    with pytest.raises(InvalidField, match="did you mean 'nodeSelector'"):
        podspec.parse_pod_document("spec: {nodeSelectr: {pool: batch}}", FIELD)


def test_a_document_near_the_size_limit_is_read() -> None:
    env = "".join(f"    - {{name: V{i}, value: '{'x' * 40}'}}\n" for i in range(3500))
    text = f"spec:\n  containers:\n  - name: base\n    env:\n{env}"
    assert len(text) < podspec.MAX_DOC_BYTES
    doc = podspec.parse_pod_document(text, FIELD)
    assert len(doc["spec"]["containers"][0]["env"]) == 3500


def test_too_many_values_are_refused() -> None:
    text = "spec: {containers: [{name: base, args: [" + ",".join(["a"] * 30000) + "]}]}"
    with pytest.raises(InvalidField, match="at most"):
        podspec.parse_pod_document(text, FIELD)


def test_plain_scalars_keep_their_yaml_meaning() -> None:
    doc = podspec.parse_pod_document(
        "metadata: {annotations: {when: '2001-12-14'}}\n"
        "spec: {hostNetwork: false, priority: 7, activeDeadlineSeconds: 0x10, overhead: {cpu: 0.5},"
        " nodeName: null, containers: [{name: base, args: [2001-12-14, 'yes', '1']}]}",
        FIELD,
    )
    spec = doc["spec"]
    assert (spec["hostNetwork"], spec["priority"], spec["activeDeadlineSeconds"]) == (False, 7, 16)
    assert spec["overhead"] == {"cpu": 0.5}
    assert spec["nodeName"] is None
    assert spec["containers"][0]["args"] == ["2001-12-14", "yes", "1"]
