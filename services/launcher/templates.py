"""The named pod templates a launcher is configured with: every `<name>.yaml` in one directory.

Templates are read once at start and validated then, so a broken template stops the launcher
with its file name instead of failing tasks later.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from services.launcher.podspec import parse_pod_document
from shepherd.validation import InvalidField


class UnknownTemplate(LookupError):
    """No template of that name is configured."""


class TemplateCatalog:
    def __init__(self, directory: Path, default: str) -> None:
        self.default = default
        self._templates: dict[str, dict[str, Any]] = {}
        for path in sorted(directory.glob("*.yaml")):
            try:
                self._templates[path.stem] = parse_pod_document(path.read_text(), str(path))
            except InvalidField as err:
                raise ValueError(f"pod template {path} is invalid: {err}") from err
        if default not in self._templates:
            raise ValueError(
                f"the default pod template {default!r} is not in {directory} (found {self.names})"
            )

    @property
    def names(self) -> list[str]:
        return sorted(self._templates)

    def get(self, name: str) -> dict[str, Any]:
        try:
            return self._templates[name or self.default]
        except KeyError:
            raise UnknownTemplate(
                f"template_name: no pod template named {name!r} (known: {self.names})"
            ) from None
