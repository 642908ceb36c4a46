"""The agent endpoint's certificates: a private CA and a server certificate, in `<state>/tls/`.

`ensure_certificates` makes them once (ECDSA P-256, the CA valid 10 years, the server certificate 2 years,
for the endpoint's address as an IP subject-alternative name); the CA certificate goes into each guest with
the agent's config (the agent verifies the host with it). Every file is written 0600 in a 0700 directory
(`system/state_dir.py`), whatever the umask.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hyperfence.system.state_dir import DIR_MODE, make_dirs, write_private


def tls_dir(state_dir: str) -> Path:
    return Path(state_dir) / "tls"


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def ensure_certificates(state_dir: str, host: ipaddress.IPv4Address) -> Path:
    """The directory holding ca.pem, server.pem and server.key for `host` (made if missing or for another
    address)."""
    d = tls_dir(state_dir)
    make_dirs(d, mode=DIR_MODE)  # an existing one was checked by `secure_state_dir` at start
    marker = d / "host"
    if (d / "server.pem").exists() and marker.exists() and marker.read_text().strip() == str(host):
        return d
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hyperfence agents CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(host))]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=730))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(host)]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    write_private(d / "ca.key", _key_pem(ca_key))
    write_private(d / "ca.pem", ca.public_bytes(serialization.Encoding.PEM))
    write_private(d / "server.key", _key_pem(key))
    write_private(d / "server.pem", server.public_bytes(serialization.Encoding.PEM))
    write_private(marker, f"{host}\n")
    return d


def server_context(state_dir: str) -> ssl.SSLContext:
    d = tls_dir(state_dir)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(d / "server.pem", d / "server.key")
    return ctx
