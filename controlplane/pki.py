"""A throw-away certificate authority for the local control plane.

The API server serves TLS and authenticates its admin, kube-scheduler and kwok by client
certificates signed here; ServiceAccount tokens are signed with a separate RSA key. A second
authority, in its own directory, issues the certificates of Shepherd's gRPC ports and of its
clients (controlplane/identities.py). Nothing here is meant for a real cluster: keys live in the
state directory and die with `cluster down`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import ipaddress
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALIDITY = dt.timedelta(days=365)


@dataclass(frozen=True)
class CertPair:
    cert: Path
    key: Path


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write atomically (temp file, then rename): a reader never sees half a key or certificate."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    tmp.replace(path)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    _write(path, pem, 0o600)


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold the directory's lock: test sessions, the demo and the benchmark may issue at once."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attrs)


class Authority:
    """Issues the certificates one cluster needs; loads an existing CA if the directory has one."""

    def __init__(self, directory: Path, ca_name: str = "shepherd-local-ca") -> None:
        self._dir = directory
        self._dir.mkdir(parents=True, exist_ok=True)
        self.ca = CertPair(directory / "ca.crt", directory / "ca.key")
        with locked(directory):
            self._load_or_create(ca_name)

    def _load_or_create(self, ca_name: str) -> None:
        if self.ca.cert.exists() and self.ca.key.exists():
            key = serialization.load_pem_private_key(self.ca.key.read_bytes(), password=None)
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            self._ca_key = key
            self._ca_cert = x509.load_pem_x509_certificate(self.ca.cert.read_bytes())
        else:
            self._ca_key = ec.generate_private_key(ec.SECP256R1())
            now = dt.datetime.now(dt.UTC)
            self._ca_cert = (
                x509.CertificateBuilder()
                .subject_name(_name(ca_name))
                .issuer_name(_name(ca_name))
                .public_key(self._ca_key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + _VALIDITY)
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(
                    x509.KeyUsage(
                        digital_signature=True,
                        key_cert_sign=True,
                        crl_sign=True,
                        content_commitment=False,
                        key_encipherment=False,
                        data_encipherment=False,
                        key_agreement=False,
                        encipher_only=False,
                        decipher_only=False,
                    ),
                    critical=True,
                )
                .sign(self._ca_key, hashes.SHA256())
            )
            _write_key(self.ca.key, self._ca_key)
            _write(self.ca.cert, self._ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)

    def issue(
        self,
        name: str,
        *,
        common_name: str,
        organization: str | None = None,
        server_hosts: list[str] | None = None,
        uris: Sequence[str] = (),
        client: bool | None = None,
    ) -> CertPair:
        """Issue (or reuse) `name.crt`/`name.key`: a server cert when hosts are given, else a client
        cert; `client=True` makes a server cert usable as a client cert too. `uris` become URI
        subject alternative names (a SPIFFE ID names a workload that way)."""
        with locked(self._dir):
            return self._issue(name, common_name, organization, server_hosts, uris, client)

    def _issue(
        self,
        name: str,
        common_name: str,
        organization: str | None,
        server_hosts: list[str] | None,
        uris: Sequence[str],
        client: bool | None,
    ) -> CertPair:
        pair = CertPair(self._dir / f"{name}.crt", self._dir / f"{name}.key")
        if pair.cert.exists() and pair.key.exists():
            return pair
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name, organization))
            .issuer_name(self._ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri) for uri in uris]
        for host in server_hosts or ():
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        usage = [ExtendedKeyUsageOID.SERVER_AUTH] if server_hosts else []
        if client or (client is None and not server_hosts):
            usage.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        cert = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False).sign(
            self._ca_key, hashes.SHA256()
        )
        _write_key(pair.key, key)
        _write(pair.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        return pair

    def service_account_keys(self) -> CertPair:
        """RSA key pair the API server signs ServiceAccount tokens with (`cert` holds the public key)."""
        pair = CertPair(self._dir / "sa.pub", self._dir / "sa.key")
        with locked(self._dir):
            if pair.cert.exists() and pair.key.exists():
                return pair
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            _write_key(pair.key, key)
            public = key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            _write(pair.cert, public, 0o644)
            return pair
