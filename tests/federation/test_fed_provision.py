"""Provisioning: a CA-signed server certificate for loopback, per-site tokens stored hashed, idempotent."""

from __future__ import annotations

import ipaddress
import json
import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from fedtest_utils import write_config

from federation.provision import hash_token, load_token_hashes, read_site_token, run_provision, verify_token
from pipeline.config import load_config


def test_provision_creates_ca_server_cert_and_hashed_tokens(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path, ["a", "b"], host="fed.example.org"))
    p = run_provision(cfg)
    ca = x509.load_pem_x509_certificate(p.ca_cert.read_bytes())
    srv = x509.load_pem_x509_certificate(p.server_cert.read_bytes())
    # the server certificate is signed by the CA (raises if the signature does not verify)
    pub = ca.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    srv.verify_directly_issued_by(ca)
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert "fed.example.org" in san.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca

    table = json.loads(p.tokens.read_text())
    hashes = load_token_hashes(p.tokens)
    for site in ("a", "b"):
        tok = read_site_token(cfg, site)
        assert len(tok) >= 40
        assert stat.S_IMODE(p.site_token(site).stat().st_mode) == 0o600
        assert tok not in p.tokens.read_text()  # the server keeps only the hash
        assert table["sites"][site]["sha256"] == hash_token(tok)
        assert verify_token(hashes, site, tok)
        assert not verify_token(hashes, site, tok + "x")
    assert not verify_token(hashes, "a", read_site_token(cfg, "b"))
    assert stat.S_IMODE(p.server_key.stat().st_mode) == 0o600

    # idempotent: a second run keeps the CA and the tokens, and a new site gets one
    before = {s: read_site_token(cfg, s) for s in ("a", "b")}
    ca_pem = p.ca_cert.read_bytes()
    cfg2 = load_config(write_config(tmp_path, ["a", "b", "c"]))
    run_provision(cfg2)
    assert p.ca_cert.read_bytes() == ca_pem
    assert {s: read_site_token(cfg2, s) for s in ("a", "b")} == before
    assert sorted(load_token_hashes(p.tokens)) == ["a", "b", "c"]
