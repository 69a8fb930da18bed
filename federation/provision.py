"""What a federation needs before it runs: a development CA, the aggregator's TLS certificate, site tokens.

Layout under ``<run>/provision/``: ``ca.pem`` (+ ``ca.key``), ``server.pem``/``server.key`` (SAN:
127.0.0.1, localhost, the configured host), ``tokens.json`` (the server's copy: sha256 of each site's
token, never the token) and ``sites/<site>/token`` (mode 0600, what that site's config finds). Tokens are
32 random bytes, so a plain sha256 is a sufficient one-way store: there is nothing to brute-force that a
slow hash would protect. Provisioning is idempotent: existing material is kept, new sites get tokens.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from federation.wire import atomic_write_bytes, atomic_write_json
from pipeline.config import ConfigError, ExperimentConfig, check_site_name
from pipeline.errors import FedpathError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProvisionPaths:
    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    @property
    def tokens(self) -> Path:
        return self.root / "tokens.json"

    def site_token(self, site: str) -> Path:
        return self.root / "sites" / check_site_name(site) / "token"


def provision_paths(cfg: ExperimentConfig) -> ProvisionPaths:
    return ProvisionPaths(cfg.run_dir / "provision")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
    os.chmod(path, 0o600)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _make_ca(p: ProvisionPaths, name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"fedpath dev CA ({name})")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(p.ca_key, _key_pem(key))
    atomic_write_bytes(p.ca_cert, cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def _load_ca(p: ProvisionPaths) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate(p.ca_cert.read_bytes())
    key = serialization.load_pem_private_key(p.ca_key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise FedpathError(f"{p.ca_key}: expected an EC private key")
    return cert, key


def _make_server_cert(
    p: ProvisionPaths, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, host: str
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    try:
        ip = ipaddress.ip_address(host)
        if str(ip) != "127.0.0.1":
            names.append(x509.IPAddress(ip))
    except ValueError:
        if host != "localhost":
            names.append(x509.DNSName(host))
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedpath aggregator")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=90))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(p.server_key, _key_pem(key))
    atomic_write_bytes(p.server_cert, cert.public_bytes(serialization.Encoding.PEM))


def load_token_hashes(path: Path) -> dict[str, str]:
    """The server's {site: sha256(token)} table; every site name in it must be a valid name."""
    if not path.is_file():
        raise FedpathError(f"{path}: no token table; run `fedpath provision --config ...` first")
    try:
        data = json.loads(path.read_text())
        table = {str(k): str(v["sha256"]) for k, v in data["sites"].items()}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        raise FedpathError(f"{path}: malformed token table") from None
    try:
        for site in table:
            check_site_name(site)
    except ConfigError as exc:
        raise FedpathError(f"{path}: {exc}") from None
    return table


def verify_token(hashes: dict[str, str], site: str, token: str) -> bool:
    """Constant-time comparison of a presented token against the stored hash."""
    want = hashes.get(site)
    return want is not None and hmac.compare_digest(want, hash_token(token))


def read_site_token(cfg: ExperimentConfig, site: str) -> str:
    path = cfg.federation.token_file or provision_paths(cfg).site_token(site)
    if not path.is_file():
        raise FedpathError(f"{path}: site {site!r} has no token; run `fedpath provision` for this run")
    token = path.read_text().strip()
    if not token:
        raise FedpathError(f"{path}: token file is empty")
    return token


def run_provision(cfg: ExperimentConfig, sites: list[str] | None = None) -> ProvisionPaths:
    """Create (or complete) the run's CA, server certificate and site tokens; return their paths."""
    p = provision_paths(cfg)
    names = sites if sites is not None else [s.name for s in cfg.sites]
    for name in names:
        check_site_name(name)
    if not names:
        raise FedpathError("config: no sites to provision (the config's `sites` list is empty)")
    p.root.mkdir(parents=True, exist_ok=True)
    if p.ca_cert.is_file() and p.ca_key.is_file():
        ca_cert, ca_key = _load_ca(p)
    else:
        ca_cert, ca_key = _make_ca(p, cfg.name)
        log.info("provision: created dev CA %s", p.ca_cert)
    if not (p.server_cert.is_file() and p.server_key.is_file()):
        _make_server_cert(p, ca_cert, ca_key, cfg.federation.host)
        log.info("provision: created server certificate %s", p.server_cert)
    table: dict[str, dict[str, str]] = {}
    if p.tokens.is_file():
        table = {k: {"sha256": v} for k, v in load_token_hashes(p.tokens).items()}
    for site in names:
        tok_path = p.site_token(site)
        if site in table and tok_path.is_file():
            continue
        token = secrets.token_urlsafe(32)
        _write_private(tok_path, (token + "\n").encode())
        table[site] = {"sha256": hash_token(token)}
        log.info("provision: token for site %s -> %s", site, tok_path)
    atomic_write_json(p.tokens, {"hash": "sha256", "sites": table})
    return p
