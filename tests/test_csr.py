"""The proxy's key + CSR (libcrypto via ctypes, and the cryptography fallback) satisfy the CA."""
import datetime as dt

import pytest
from cryptography.hazmat.primitives import serialization

from identity import ca
from microproxy import csr

IDENT = "books.default.serviceaccount.identity.cluster.local"


@pytest.mark.parametrize("make", [csr._openssl_key_and_csr, csr._cryptography_key_and_csr])
def test_csr_is_accepted_and_matches_key(make):
    key_pem, csr_pem = make(IDENT)
    parsed = ca.check_csr(csr_pem, IDENT)           # signature, single DNS SAN, CN
    key = serialization.load_pem_private_key(key_pem, None)
    assert key.public_key() == parsed.public_key()
    assert key.curve.name == "secp256r1"
    with pytest.raises(ca.CSRError):
        ca.check_csr(csr_pem, "other.default.serviceaccount.identity.cluster.local")


def test_not_after_reads_leaf_expiry():
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    anchor, akey = ca.new_anchor(now)
    issuer, ikey = ca.new_issuer(anchor, akey, now)
    chain, _ = ca.self_issue(IDENT, issuer, ikey, now, lifetime=dt.timedelta(hours=1))
    leaf = ca.load_certs(chain)[0]
    assert csr.not_after(chain) == leaf.not_valid_after_utc.timestamp()
