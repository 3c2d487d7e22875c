"""The shape of the v1 Pod fields Shepherd accepts in a template or an override, with their types.

Kubernetes ignores unknown fields unless asked not to, so a misspelt `nodeSelectr` used to vanish
without a word, and a value of the wrong type reached the pod builder as whatever YAML made of it.
Every template and override is checked against this schema when it is read, and the error names
the exact field (with a suggestion for a near miss). It is a compact transcription of the
Kubernetes 1.35 Pod API: fields a worker pod has no business setting (status, owner references,
ephemeral containers, the deprecated in-tree volume plugins) are not in it, so they are refused by
name as well. The API server's strict field validation on create stays as the last word.
"""

from __future__ import annotations

import difflib
import enum
import math
import re
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from shepherd.validation import InvalidField


class Scalar(enum.Enum):
    STRING = "a string"
    BOOL = "true or false"
    INT32 = "a 32-bit integer"
    INT64 = "a 64-bit integer"
    QUANTITY = "a quantity (e.g. 500m, 1Gi, 2)"
    INT_OR_STRING = "an integer or a string"


@dataclass(frozen=True)
class ListOf:
    item: Schema
    name_key: str = ""  # items are named by this key in error paths, e.g. containers[base]


@dataclass(frozen=True)
class MapOf:
    value: Schema


@dataclass(frozen=True)
class Obj:
    kind: str
    fields: dict[str, Schema]
    required: tuple[str, ...] = field(default=())


Schema: TypeAlias = Scalar | ListOf | MapOf | Obj

_INT_RANGE = {Scalar.INT32: 2**31, Scalar.INT64: 2**63}
_QUANTITY = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|[KMGTPE]i|[numkMGTPE])?$")

S, B, I32, I64, Q = Scalar.STRING, Scalar.BOOL, Scalar.INT32, Scalar.INT64, Scalar.QUANTITY
IOS = Scalar.INT_OR_STRING
STRINGS = ListOf(S)
STRING_MAP = MapOf(S)


def _obj(kind: str, required: tuple[str, ...] = (), /, **fields: Schema) -> Obj:
    return Obj(kind, fields, required)


NAME_REF = _obj("LocalObjectReference", name=S)
KEY_TO_PATH = ListOf(_obj("KeyToPath", ("key", "path"), key=S, path=S, mode=I32))
FIELD_REF = _obj("ObjectFieldSelector", ("fieldPath",), apiVersion=S, fieldPath=S)
RESOURCE_FIELD_REF = _obj("ResourceFieldSelector", ("resource",), containerName=S, resource=S, divisor=Q)
LABEL_SELECTOR = _obj(
    "LabelSelector",
    matchLabels=STRING_MAP,
    matchExpressions=ListOf(
        _obj("LabelSelectorRequirement", ("key", "operator"), key=S, operator=S, values=STRINGS)
    ),
)
SE_LINUX = _obj("SELinuxOptions", user=S, role=S, type=S, level=S)
WINDOWS = _obj(
    "WindowsSecurityContextOptions",
    gmsaCredentialSpecName=S,
    gmsaCredentialSpec=S,
    runAsUserName=S,
    hostProcess=B,
)
PROFILE = _obj("SeccompProfile", ("type",), type=S, localhostProfile=S)
EXEC = _obj("ExecAction", command=STRINGS)
HTTP_GET = _obj(
    "HTTPGetAction",
    ("port",),
    path=S,
    port=IOS,
    host=S,
    scheme=S,
    httpHeaders=ListOf(_obj("HTTPHeader", ("name", "value"), name=S, value=S)),
)
TCP_SOCKET = _obj("TCPSocketAction", ("port",), port=IOS, host=S)
PROBE = _obj(
    "Probe",
    exec=EXEC,
    httpGet=HTTP_GET,
    tcpSocket=TCP_SOCKET,
    grpc=_obj("GRPCAction", ("port",), port=I32, service=S),
    initialDelaySeconds=I32,
    timeoutSeconds=I32,
    periodSeconds=I32,
    successThreshold=I32,
    failureThreshold=I32,
    terminationGracePeriodSeconds=I64,
)
HANDLER = _obj(
    "LifecycleHandler",
    exec=EXEC,
    httpGet=HTTP_GET,
    tcpSocket=TCP_SOCKET,
    sleep=_obj("SleepAction", ("seconds",), seconds=I64),
)
RESOURCES = _obj(
    "ResourceRequirements",
    limits=MapOf(Q),
    requests=MapOf(Q),
    claims=ListOf(_obj("ResourceClaim", ("name",), name=S, request=S), "name"),
)
SECURITY_CONTEXT = _obj(
    "SecurityContext",
    capabilities=_obj("Capabilities", add=STRINGS, drop=STRINGS),
    privileged=B,
    seLinuxOptions=SE_LINUX,
    windowsOptions=WINDOWS,
    runAsUser=I64,
    runAsGroup=I64,
    runAsNonRoot=B,
    readOnlyRootFilesystem=B,
    allowPrivilegeEscalation=B,
    procMount=S,
    seccompProfile=PROFILE,
    appArmorProfile=_obj("AppArmorProfile", ("type",), type=S, localhostProfile=S),
)
CONTAINER = _obj(
    "Container",
    ("name",),
    name=S,
    image=S,
    command=STRINGS,
    args=STRINGS,
    workingDir=S,
    ports=ListOf(
        _obj(
            "ContainerPort",
            ("containerPort",),
            name=S,
            hostPort=I32,
            containerPort=I32,
            protocol=S,
            hostIP=S,
        )
    ),
    envFrom=ListOf(
        _obj(
            "EnvFromSource",
            prefix=S,
            configMapRef=_obj("ConfigMapEnvSource", name=S, optional=B),
            secretRef=_obj("SecretEnvSource", name=S, optional=B),
        )
    ),
    env=ListOf(
        _obj(
            "EnvVar",
            ("name",),
            name=S,
            value=S,
            valueFrom=_obj(
                "EnvVarSource",
                fieldRef=FIELD_REF,
                resourceFieldRef=RESOURCE_FIELD_REF,
                configMapKeyRef=_obj("ConfigMapKeySelector", ("key",), name=S, key=S, optional=B),
                secretKeyRef=_obj("SecretKeySelector", ("key",), name=S, key=S, optional=B),
            ),
        ),
        "name",
    ),
    resources=RESOURCES,
    resizePolicy=ListOf(
        _obj("ContainerResizePolicy", ("resourceName", "restartPolicy"), resourceName=S, restartPolicy=S)
    ),
    restartPolicy=S,
    volumeMounts=ListOf(
        _obj(
            "VolumeMount",
            ("name", "mountPath"),
            name=S,
            readOnly=B,
            recursiveReadOnly=S,
            mountPath=S,
            subPath=S,
            mountPropagation=S,
            subPathExpr=S,
        )
    ),
    volumeDevices=ListOf(_obj("VolumeDevice", ("name", "devicePath"), name=S, devicePath=S)),
    livenessProbe=PROBE,
    readinessProbe=PROBE,
    startupProbe=PROBE,
    lifecycle=_obj("Lifecycle", postStart=HANDLER, preStop=HANDLER, stopSignal=S),
    terminationMessagePath=S,
    terminationMessagePolicy=S,
    imagePullPolicy=S,
    securityContext=SECURITY_CONTEXT,
    stdin=B,
    stdinOnce=B,
    tty=B,
)
NODE_SELECTOR_REQUIREMENT = _obj(
    "NodeSelectorRequirement", ("key", "operator"), key=S, operator=S, values=STRINGS
)
NODE_SELECTOR_TERM = _obj(
    "NodeSelectorTerm",
    matchExpressions=ListOf(NODE_SELECTOR_REQUIREMENT),
    matchFields=ListOf(NODE_SELECTOR_REQUIREMENT),
)
POD_AFFINITY_TERM = _obj(
    "PodAffinityTerm",
    ("topologyKey",),
    labelSelector=LABEL_SELECTOR,
    namespaceSelector=LABEL_SELECTOR,
    namespaces=STRINGS,
    topologyKey=S,
    matchLabelKeys=STRINGS,
    mismatchLabelKeys=STRINGS,
)
POD_AFFINITY = _obj(
    "PodAffinity",
    requiredDuringSchedulingIgnoredDuringExecution=ListOf(POD_AFFINITY_TERM),
    preferredDuringSchedulingIgnoredDuringExecution=ListOf(
        _obj(
            "WeightedPodAffinityTerm",
            ("weight", "podAffinityTerm"),
            weight=I32,
            podAffinityTerm=POD_AFFINITY_TERM,
        )
    ),
)
AFFINITY = _obj(
    "Affinity",
    nodeAffinity=_obj(
        "NodeAffinity",
        requiredDuringSchedulingIgnoredDuringExecution=_obj(
            "NodeSelector", ("nodeSelectorTerms",), nodeSelectorTerms=ListOf(NODE_SELECTOR_TERM)
        ),
        preferredDuringSchedulingIgnoredDuringExecution=ListOf(
            _obj(
                "PreferredSchedulingTerm", ("weight", "preference"), weight=I32, preference=NODE_SELECTOR_TERM
            )
        ),
    ),
    podAffinity=POD_AFFINITY,
    podAntiAffinity=POD_AFFINITY,
)
PROJECTION = _obj(
    "VolumeProjection",
    secret=_obj("SecretProjection", name=S, items=KEY_TO_PATH, optional=B),
    configMap=_obj("ConfigMapProjection", name=S, items=KEY_TO_PATH, optional=B),
    downwardAPI=_obj(
        "DownwardAPIProjection",
        items=ListOf(
            _obj(
                "DownwardAPIVolumeFile",
                ("path",),
                path=S,
                fieldRef=FIELD_REF,
                resourceFieldRef=RESOURCE_FIELD_REF,
                mode=I32,
            )
        ),
    ),
    serviceAccountToken=_obj(
        "ServiceAccountTokenProjection", ("path",), audience=S, expirationSeconds=I64, path=S
    ),
    clusterTrustBundle=_obj(
        "ClusterTrustBundleProjection",
        ("path",),
        name=S,
        signerName=S,
        labelSelector=LABEL_SELECTOR,
        optional=B,
        path=S,
    ),
)
DOWNWARD_API_FILES = ListOf(
    _obj(
        "DownwardAPIVolumeFile",
        ("path",),
        path=S,
        fieldRef=FIELD_REF,
        resourceFieldRef=RESOURCE_FIELD_REF,
        mode=I32,
    )
)
# The volume sources a pod may name: those of the restricted Pod Security Standard, plus hostPath
# and nfs, which the pod policy refuses unless relaxed.
VOLUME_SOURCES: dict[str, Schema] = {
    "emptyDir": _obj("EmptyDirVolumeSource", medium=S, sizeLimit=Q),
    "configMap": _obj("ConfigMapVolumeSource", name=S, items=KEY_TO_PATH, defaultMode=I32, optional=B),
    "secret": _obj("SecretVolumeSource", secretName=S, items=KEY_TO_PATH, defaultMode=I32, optional=B),
    "persistentVolumeClaim": _obj(
        "PersistentVolumeClaimVolumeSource", ("claimName",), claimName=S, readOnly=B
    ),
    "projected": _obj("ProjectedVolumeSource", sources=ListOf(PROJECTION), defaultMode=I32),
    "downwardAPI": _obj("DownwardAPIVolumeSource", items=DOWNWARD_API_FILES, defaultMode=I32),
    "csi": _obj(
        "CSIVolumeSource",
        ("driver",),
        driver=S,
        readOnly=B,
        fsType=S,
        volumeAttributes=STRING_MAP,
        nodePublishSecretRef=NAME_REF,
    ),
    "ephemeral": _obj(
        "EphemeralVolumeSource",
        volumeClaimTemplate=_obj(
            "PersistentVolumeClaimTemplate",
            ("spec",),
            metadata=_obj("ObjectMeta", labels=STRING_MAP, annotations=STRING_MAP),
            spec=_obj(
                "PersistentVolumeClaimSpec",
                accessModes=STRINGS,
                selector=LABEL_SELECTOR,
                resources=_obj("VolumeResourceRequirements", limits=MapOf(Q), requests=MapOf(Q)),
                volumeName=S,
                storageClassName=S,
                volumeMode=S,
                dataSource=_obj("TypedLocalObjectReference", ("kind", "name"), apiGroup=S, kind=S, name=S),
                dataSourceRef=_obj(
                    "TypedObjectReference", ("kind", "name"), apiGroup=S, kind=S, name=S, namespace=S
                ),
                volumeAttributesClassName=S,
            ),
        ),
    ),
    "image": _obj("ImageVolumeSource", reference=S, pullPolicy=S),
    "hostPath": _obj("HostPathVolumeSource", ("path",), path=S, type=S),
    "nfs": _obj("NFSVolumeSource", ("server", "path"), server=S, path=S, readOnly=B),
}
VOLUME = Obj("Volume", {"name": S, **VOLUME_SOURCES}, ("name",))
POD_SECURITY_CONTEXT = _obj(
    "PodSecurityContext",
    seLinuxOptions=SE_LINUX,
    windowsOptions=WINDOWS,
    runAsUser=I64,
    runAsGroup=I64,
    runAsNonRoot=B,
    supplementalGroups=ListOf(I64),
    supplementalGroupsPolicy=S,
    fsGroup=I64,
    sysctls=ListOf(_obj("Sysctl", ("name", "value"), name=S, value=S)),
    fsGroupChangePolicy=S,
    seccompProfile=PROFILE,
    appArmorProfile=_obj("AppArmorProfile", ("type",), type=S, localhostProfile=S),
    seLinuxChangePolicy=S,
)
POD_SPEC = _obj(
    "PodSpec",
    volumes=ListOf(VOLUME, "name"),
    initContainers=ListOf(CONTAINER, "name"),
    containers=ListOf(CONTAINER, "name"),
    restartPolicy=S,
    terminationGracePeriodSeconds=I64,
    activeDeadlineSeconds=I64,
    dnsPolicy=S,
    nodeSelector=STRING_MAP,
    serviceAccountName=S,
    serviceAccount=S,
    automountServiceAccountToken=B,
    nodeName=S,
    hostNetwork=B,
    hostPID=B,
    hostIPC=B,
    shareProcessNamespace=B,
    securityContext=POD_SECURITY_CONTEXT,
    imagePullSecrets=ListOf(NAME_REF),
    hostname=S,
    subdomain=S,
    affinity=AFFINITY,
    schedulerName=S,
    tolerations=ListOf(
        _obj(
            "Toleration",
            key=S,
            operator=S,
            value=S,
            effect=S,
            tolerationSeconds=I64,
        )
    ),
    hostAliases=ListOf(_obj("HostAlias", ("ip",), ip=S, hostnames=STRINGS)),
    priorityClassName=S,
    priority=I32,
    dnsConfig=_obj(
        "PodDNSConfig",
        nameservers=STRINGS,
        searches=STRINGS,
        options=ListOf(_obj("PodDNSConfigOption", name=S, value=S)),
    ),
    readinessGates=ListOf(_obj("PodReadinessGate", ("conditionType",), conditionType=S)),
    runtimeClassName=S,
    enableServiceLinks=B,
    preemptionPolicy=S,
    overhead=MapOf(Q),
    topologySpreadConstraints=ListOf(
        _obj(
            "TopologySpreadConstraint",
            ("maxSkew", "topologyKey", "whenUnsatisfiable"),
            maxSkew=I32,
            topologyKey=S,
            whenUnsatisfiable=S,
            labelSelector=LABEL_SELECTOR,
            minDomains=I32,
            nodeAffinityPolicy=S,
            nodeTaintsPolicy=S,
            matchLabelKeys=STRINGS,
        )
    ),
    setHostnameAsFQDN=B,
    os=_obj("PodOS", ("name",), name=S),
    hostUsers=B,
    schedulingGates=ListOf(_obj("PodSchedulingGate", ("name",), name=S)),
    resourceClaims=ListOf(
        _obj("PodResourceClaim", ("name",), name=S, resourceClaimName=S, resourceClaimTemplateName=S), "name"
    ),
    resources=_obj("ResourceRequirements", limits=MapOf(Q), requests=MapOf(Q)),
)
POD = _obj(
    "Pod",
    apiVersion=S,
    kind=S,
    metadata=_obj(
        "ObjectMeta", name=S, generateName=S, namespace=S, labels=STRING_MAP, annotations=STRING_MAP
    ),
    spec=POD_SPEC,
)


def check_pod(doc: Any, field: str) -> None:
    """INVALID_ARGUMENT naming the first field of `doc` that is unknown or of the wrong type."""
    _check(doc, POD, field)


def _check(value: Any, schema: Schema, path: str) -> None:
    if isinstance(schema, Scalar):
        _check_scalar(value, schema, path)
    elif isinstance(schema, Obj):
        if not isinstance(value, dict):
            raise InvalidField(path, f"must be a mapping (a {schema.kind}), not {describe(value)}")
        for name, item in value.items():
            sub = schema.fields.get(name)
            if sub is None:
                raise InvalidField(f"{path}.{_key(name)}", _unknown(name, schema))
            if item is not None:  # null means unset, as in Kubernetes
                _check(item, sub, f"{path}.{name}")
        for name in schema.required:
            if value.get(name) is None:
                raise InvalidField(f"{path}.{name}", f"is required in a {schema.kind}")
    elif isinstance(schema, ListOf):
        if not isinstance(value, list):
            raise InvalidField(path, f"must be a list, not {describe(value)}")
        for i, item in enumerate(value):
            name = item.get(schema.name_key) if schema.name_key and isinstance(item, dict) else None
            _check(item, schema.item, f"{path}[{_key(name) if isinstance(name, str) and name else i}]")
    else:
        if not isinstance(value, dict):
            raise InvalidField(path, f"must be a mapping, not {describe(value)}")
        for key, item in value.items():
            _check(item, schema.value, f"{path}.{_key(key)}")


def _check_scalar(value: Any, kind: Scalar, path: str) -> None:
    if kind is Scalar.STRING:
        ok = isinstance(value, str)
    elif kind is Scalar.BOOL:
        ok = isinstance(value, bool)
    elif kind in _INT_RANGE:
        ok = isinstance(value, int) and not isinstance(value, bool)
        if ok and not -_INT_RANGE[kind] <= value < _INT_RANGE[kind]:
            raise InvalidField(path, f"{value} does not fit in {kind.value}")
    elif kind is Scalar.INT_OR_STRING:
        ok = isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))
        if ok and isinstance(value, int) and not -(2**31) <= value < 2**31:
            raise InvalidField(path, f"{value} does not fit in a 32-bit integer")
    else:
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidField(path, f"must be {kind.value}, not {value}")
        ok = (isinstance(value, int | float) and not isinstance(value, bool) and abs(value) < 2**63) or (
            isinstance(value, str) and bool(_QUANTITY.match(value))
        )
    if not ok:
        raise InvalidField(path, f"must be {kind.value}, not {describe(value)}")


def _key(name: str) -> str:
    """A key as it appears in a field path: long ones cut, so an error message stays small."""
    return name if len(name) <= 64 else name[:61] + "..."


def _unknown(name: str, schema: Obj) -> str:
    close = difflib.get_close_matches(name, schema.fields, n=1) if len(name) <= 64 else []
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"is not a field of {schema.kind} that Shepherd accepts{hint}"


def describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    return f"{value!r}"[:60]
