"""A TCP gate in front of the API server: closed, every connection is dropped at once (so a
service's creates fail and are retried); open, connections are forwarded untouched (TLS
included). Lets a test hold a service's pod creates back until it has set up a fault."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import yaml


@dataclass
class Gate:
    target_host: str
    target_port: int
    open: bool = False
    port: int = 0
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            self._writers -= {writer, up_writer}

    def shut(self) -> None:
        """Close the gate, cutting the connections already through it (clients keep them alive)."""
        self.open = False
        for writer in list(self._writers):
            writer.close()

    def kubeconfig(self, kubeconfig: str, directory: Path) -> str:
        """A copy of `kubeconfig` that reaches the API server through this gate."""
        doc = yaml.safe_load(Path(kubeconfig).read_text())
        doc["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{self.port}"
        path = directory / "gated.kubeconfig"
        path.write_text(yaml.safe_dump(doc))
        return str(path)


@contextlib.asynccontextmanager
async def gate_to(server_url: str) -> AsyncIterator[Gate]:
    """An open gate to the API server at `server_url`, serving for the block."""
    target = urlsplit(server_url)
    gate = Gate(target.hostname or "127.0.0.1", target.port or 443, open=True)
    server = await asyncio.start_server(gate._handle, "127.0.0.1", 0)
    gate.port = server.sockets[0].getsockname()[1]
    try:
        yield gate
    finally:
        server.close()
        for writer in list(gate._writers):
            writer.close()
        await server.wait_closed()
