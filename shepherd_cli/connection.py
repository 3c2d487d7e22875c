"""The connection file: where `shepherd serve` left the services and how a client talks to them.

`shepherd serve` writes it once its services are SERVING; the CLI (and any client in any language)
reads it instead of taking three addresses and three certificate paths on every command. It holds
paths to the credentials, never their contents, and is written owner-readable only.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from shepherd import channels

SERVICES = ("launcher", "watcher", "reconciler")
ENV_VAR = "SHEPHERD_CONNECTION"


def default_path() -> Path:
    """`$SHEPHERD_CONNECTION`, else `$XDG_CONFIG_HOME/shepherd/connection.json`."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config / "shepherd" / "connection.json"


class ConnectionFileError(RuntimeError):
    """The connection file is missing or malformed; the message says what to run."""


@dataclass(frozen=True)
class Connection:
    """Addresses of the three services and the scheduler credentials that may call them."""

    launcher: str
    watcher: str
    reconciler: str
    executor_id: str
    # All three empty: the services run in plaintext (`shepherd serve --insecure`).
    ca: str = ""
    cert: str = ""
    key: str = ""
    identity: str = ""
    # Each service's Prometheus endpoint (http://host:port/metrics); empty: not known.
    launcher_metrics: str = ""
    watcher_metrics: str = ""
    reconciler_metrics: str = ""

    def address(self, service: str) -> str:
        return str(getattr(self, service))

    def metrics_url(self, service: str) -> str:
        return str(getattr(self, f"{service}_metrics"))

    def credentials(self) -> channels.ClientCredentials:
        if not self.ca:
            return channels.PLAINTEXT
        return channels.ClientCredentials(
            ca=Path(self.ca),
            cert=Path(self.cert) if self.cert else None,
            key=Path(self.key) if self.key else None,
        )

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(asdict(self), out, indent=2)
            out.write("\n")
        tmp.replace(path)  # a reader never sees half a file

    @classmethod
    def read(cls, path: Path) -> Connection:
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConnectionFileError(
                f"no connection file at {path}: start the services with `shepherd serve`, "
                f"or point --connection / ${ENV_VAR} at one"
            ) from None
        except (OSError, ValueError) as err:
            raise ConnectionFileError(f"cannot read the connection file {path}: {err}") from None
        if not isinstance(doc, dict):
            raise ConnectionFileError(f"the connection file {path} is not a JSON object")
        missing = [name for name in (*SERVICES, "executor_id") if not isinstance(doc.get(name), str)]
        if missing:
            raise ConnectionFileError(f"the connection file {path} lacks {', '.join(missing)}")
        known = {name: str(doc[name]) for name in cls.__dataclass_fields__ if name in doc}
        return cls(**known)
