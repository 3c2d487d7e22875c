"""Which Shepherd release this process runs, for the services' build-info metric and the CLI's
`--version` and `status`: one answer, so the two can be compared."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def release() -> str:
    """This package's version, as installed ("unknown" when run from a tree never installed)."""
    try:
        return version("shepherd")
    except PackageNotFoundError:
        return "unknown"
