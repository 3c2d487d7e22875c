"""Named failure points, so fault tests can make a real code path fail the way production would.

A service reads `SHEPHERD_FAILPOINTS` once at start: a comma-separated list of `name=spec`, where
spec is `N` (the next N hits fail), `pP` (each hit fails with probability P, e.g. `p0.01`), or
`off`. Unset, every `hit()` is one dict lookup that finds nothing, so the hooks cost nothing in
production. The names in use are listed in `NAMES`; an unknown name fails fast at start, so a
typo in a fault test cannot silently test nothing.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

ENV = "SHEPHERD_FAILPOINTS"

# Every failure point in the code base, and what failing it simulates.
NAMES: dict[str, str] = {
    "sqlite.commit": "a SQLite COMMIT fails (disk error) in either stateful service",
    "launcher.settle": "a pod create's outcome is lost before it is stored, as when the launcher dies "
    "right after the create: the launch stays ACCEPTED though its pod exists",
    "creator.worker": "a pod-creator worker fails between launches (a bug), taking the pod creator down",
}


class FailpointError(OSError):
    """Raised by an armed failure point. An OSError, like the real faults it stands in for."""


@dataclass
class _Armed:
    remaining: int | None  # fail this many more hits; None: use the probability
    probability: float = 0.0


_armed: dict[str, _Armed] = {}


def parse(spec: str) -> dict[str, _Armed]:
    """Parse a `SHEPHERD_FAILPOINTS` value; ValueError names the bad entry."""
    armed: dict[str, _Armed] = {}
    for entry in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, value = entry.partition("=")
        if not sep or name not in NAMES:
            raise ValueError(f"{ENV}: {entry!r} is not name=spec with a name from {sorted(NAMES)}")
        if value == "off":
            continue
        try:
            if value.startswith("p"):
                probability = float(value[1:])
                if not 0.0 <= probability <= 1.0:
                    raise ValueError
                armed[name] = _Armed(None, probability)
            else:
                armed[name] = _Armed(int(value))
        except ValueError:
            raise ValueError(f"{ENV}: {entry!r}: spec must be N, pP (0 <= P <= 1) or off") from None
    return armed


def configure(spec: str | None = None) -> None:
    """Arm the failure points from `spec` (default: the environment). Called once at start."""
    _armed.clear()
    _armed.update(parse(os.environ.get(ENV, "") if spec is None else spec))


def hit(name: str) -> None:
    """Raise FailpointError if `name` is armed and due to fail now."""
    armed = _armed.get(name)
    if armed is None:
        return
    if armed.remaining is not None:
        if armed.remaining <= 0:
            return
        armed.remaining -= 1
    elif random.random() >= armed.probability:
        return
    raise FailpointError(f"failpoint {name}: injected failure ({NAMES[name]})")
