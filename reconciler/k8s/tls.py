"""The admission webhook's serving certificate, signed by the cluster's intermediate.

The API server calls the webhook at `lockgate-operator.lockgate-system.svc` and checks the chain against
the MutatingWebhookConfiguration's caBundle, which holds the mesh root. So the operator can make its own
serving certificate at start from the intermediate it already has (the Secret `lockgate-ca`): no serving
key is ever written into a manifest, and no cert-manager is needed. Pure apart from the key's randomness.
"""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from multicluster.ca import BACKDATE, CA, pem
from reconciler.k8s.install import NAMESPACE, SERVICE

SERVING_TTL = dt.timedelta(days=30)
"""Default lifetime; the operator makes a new one at every start (and should again at half of it)."""

SERVICE_DNS_NAMES = (SERVICE, f"{SERVICE}.{NAMESPACE}", f"{SERVICE}.{NAMESPACE}.svc")
"""The names the API server may use for the webhook Service (it uses the `.svc` one)."""


def serving_certificate(authority: CA, *, dns_names: list[str], now: dt.datetime,
                        ttl: dt.timedelta = SERVING_TTL) -> tuple[str, str]:
    """(PEM chain leaf + intermediates, PEM PKCS#8 key) of a TLS server certificate for the Service's
    names plus `dns_names`. The chain stops below the root: the client has the root (caBundle)."""
    names = list(dict.fromkeys([*SERVICE_DNS_NAMES, *dns_names]))
    key = ec.generate_private_key(ec.SECP256R1())
    not_after = min(now + ttl, authority.cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "lockgate"),
                                 x509.NameAttribute(NameOID.COMMON_NAME, SERVICE_DNS_NAMES[-1])]))
        .issuer_name(authority.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(authority.key.public_key()),
                       critical=False)
        .sign(authority.key, hashes.SHA256())
    )
    above = [authority.cert, *(c for c in authority.chain if c.subject != c.issuer)]
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    return "".join(pem(c) for c in [cert, *above]), key_pem
