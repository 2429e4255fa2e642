"""Mutual-TLS contexts for agent channels, and a throwaway PKI for tests and the lab.

Both ends present a certificate signed by the deployment's CA and verify the other's: the
wire protocol itself carries no authentication (docs/protocol.md), so TLS is the only thing
standing between an agent and anyone who can reach its port.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import ssl
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, cast

from netpass.errors import HostError, UsageError

__all__ = [
    "TestPki",
    "client_context",
    "make_test_pki",
    "peer_subject",
    "server_context",
]

MIN_TLS: Final = ssl.TLSVersion.TLSv1_2

# getpeercert() attribute names -> the short RFC 4514 keys people recognise in logs.
_RDN_KEYS: Final = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
    "emailAddress": "emailAddress",
}


def _readable(path: str | os.PathLike[str], what: str) -> str:
    # ssl's own messages for a bad path are "[Errno 2] No such file or directory" with no
    # name attached; check first so the user learns which of the three files is wrong.
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{what} {p} does not exist")
    if not p.is_file():
        raise UsageError(f"{what} {p} is not a regular file")
    try:
        with p.open("rb") as f:
            f.read(1)
    except OSError as exc:
        raise UsageError(f"{what} {p} is not readable: {exc.strerror or exc}") from None
    return str(p)


def _load(ctx: ssl.SSLContext, cert: str, key: str, ca: str) -> None:
    cert_p = _readable(cert, "certificate")
    key_p = _readable(key, "private key")
    ca_p = _readable(ca, "CA certificate")
    try:
        ctx.load_cert_chain(cert_p, key_p)
    except ssl.SSLError as exc:
        raise UsageError(
            f"cannot use certificate {cert_p} with key {key_p}: {exc.reason or exc}"
            " (not PEM, or the key does not match the certificate)"
        ) from None
    try:
        ctx.load_verify_locations(cafile=ca_p)
    except ssl.SSLError as exc:
        raise UsageError(f"cannot load CA certificate {ca_p}: {exc.reason or exc}") from None


def _harden(ctx: ssl.SSLContext) -> None:
    ctx.minimum_version = MIN_TLS
    ctx.verify_mode = ssl.CERT_REQUIRED
    # Session tickets buy nothing for a handful of long-lived connections and would let a
    # ticket outlive a revoked client certificate.
    ctx.options |= ssl.OP_NO_TICKET


def server_context(
    cert: str | os.PathLike[str], key: str | os.PathLike[str], ca: str | os.PathLike[str]
) -> ssl.SSLContext:
    """Context for an agent's listening side: presents ``cert`` and requires a client
    certificate signed by ``ca``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx)
    _load(ctx, os.fspath(cert), os.fspath(key), os.fspath(ca))
    return ctx


def client_context(
    cert: str | os.PathLike[str],
    key: str | os.PathLike[str],
    ca: str | os.PathLike[str],
    *,
    check_hostname: bool = True,
) -> ssl.SSLContext:
    """Context for the connecting side: presents ``cert`` and requires the server's
    certificate to be signed by ``ca``.

    With ``check_hostname`` the server certificate must also name the host dialled (SAN);
    turn it off only where agents are addressed by something their certificates cannot name,
    the CA then being the sole check.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(ctx)
    ctx.check_hostname = check_hostname
    _load(ctx, os.fspath(cert), os.fspath(key), os.fspath(ca))
    return ctx


def peer_subject(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    """The verified peer certificate's subject as ``CN=...,O=...``, or None without one."""
    if ssl_object is None:
        return None
    cert = ssl_object.getpeercert()
    if not cert:
        return None
    # typeshed types the dict's values as a union; "subject" is always RDN tuples.
    subject = cast(tuple[tuple[tuple[str, str], ...], ...], cert.get("subject", ()))
    parts: list[str] = []
    for rdn in subject:
        for name, value in rdn:
            parts.append(f"{_RDN_KEYS.get(name, name)}={value}")
    return ",".join(parts) or None


# --- test / lab PKI -------------------------------------------------------------------------

# One config for every command, so the result does not depend on the host's openssl.cnf
# (whose default extensions would otherwise clash with ours).
_OPENSSL_CNF: Final = """\
[req]
distinguished_name = req_dn
prompt = no
[req_dn]
CN = unused
[v3_ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[v3_server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = {san}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
[v3_client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
"""
_EC_KEY: Final = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]


@dataclass(frozen=True, slots=True)
class TestPki:
    """Paths of a generated CA and one server and one client certificate."""

    __test__ = False  # not a pytest test class, despite the name

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def at(cls, directory: str | os.PathLike[str]) -> TestPki:
        """The PKI make_test_pki() wrote in DIRECTORY."""
        d = Path(directory)
        return cls(
            ca_cert=d / "ca.crt",
            ca_key=d / "ca.key",
            server_cert=d / "server.crt",
            server_key=d / "server.key",
            client_cert=d / "client.crt",
            client_key=d / "client.key",
        )

    def server_context(self) -> ssl.SSLContext:
        return server_context(self.server_cert, self.server_key, self.ca_cert)

    def client_context(self, *, check_hostname: bool = True) -> ssl.SSLContext:
        return client_context(
            self.client_cert, self.client_key, self.ca_cert, check_hostname=check_hostname
        )


def _san(name: str) -> str:
    try:
        return f"IP:{ipaddress.ip_address(name)}"
    except ValueError:
        return f"DNS:{name}"


def _openssl(cwd: Path, *args: str) -> None:
    exe = shutil.which("openssl")
    if exe is None:
        raise HostError("the openssl command is needed to generate test certificates")
    proc = subprocess.run(
        [exe, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    if proc.returncode != 0:
        detail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise HostError(f"openssl {args[0]} failed: {detail}")


def make_test_pki(
    directory: str | os.PathLike[str],
    *,
    server_cn: str = "netpass-agent",
    server_names: Sequence[str] = ("localhost", "127.0.0.1", "::1"),
    client_cn: str = "netpass-orchestrator",
    org: str = "netpass lab",
    days: int = 30,
) -> TestPki:
    """Generate a CA plus a server and a client certificate (EC P-256) in ``directory``.

    For tests and the built-in lab only: the CA key is left next to the certificates. The
    server certificate's subjectAltName lists ``server_names`` (host names or IP addresses),
    which is what a client with check_hostname matches. docs/agent.md lists the equivalent
    commands.
    """
    if not server_names:
        raise UsageError("the server certificate needs at least one name")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cnf = d / "openssl.cnf"
    cnf.write_text(_OPENSSL_CNF.format(san=", ".join(_san(n) for n in server_names)))
    common = ["-config", cnf.name]
    ca_args = ["-keyout", "ca.key", "-out", "ca.crt", "-days", str(days), "-extensions", "v3_ca"]
    _openssl(d, "req", *common, "-x509", *_EC_KEY, *ca_args, "-subj", f"/O={org}/CN={org} CA")
    for name, cn in (("server", server_cn), ("client", client_cn)):
        csr_args = ["-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/O={org}/CN={cn}"]
        _openssl(d, "req", *common, "-new", *_EC_KEY, *csr_args)
        sign_args = [
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-set_serial",
            f"0x{secrets.token_hex(16)}",
        ]
        ext_args = ["-extfile", cnf.name, "-extensions", f"v3_{name}", "-days", str(days)]
        _openssl(
            d, "x509", "-req", "-in", f"{name}.csr", *sign_args, *ext_args, "-out", f"{name}.crt"
        )
        (d / f"{name}.csr").unlink()
    for key in ("ca.key", "server.key", "client.key"):
        (d / key).chmod(0o600)
    return TestPki.at(d)
