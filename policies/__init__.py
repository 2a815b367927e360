"""Security intent: mTLS modes, authorization, rate limits; their pure render (validation: policies.validate)."""

from policies.identity import IssuedCert, identity_of, service_identities, spiffe_id
from policies.intent import KINDS, AuthorizationPolicy, PeerAuthentication, RateLimit
from policies.render import SecurityExtension, mtls_mode

__all__ = [
    "KINDS",
    "AuthorizationPolicy",
    "IssuedCert",
    "PeerAuthentication",
    "RateLimit",
    "SecurityExtension",
    "identity_of",
    "mtls_mode",
    "service_identities",
    "spiffe_id",
]
