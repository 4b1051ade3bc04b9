"""The OpenID Connect provider of the approval tests (tests/peers/oidc.py)
checked on its own, with joserfc against its JWKS: if these fail, an
approval test's refusal would prove nothing about the agent."""
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from joserfc import jwt
from joserfc.errors import BadSignatureError, ExpiredTokenError, InvalidClaimError
from joserfc.jwk import KeySet

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "peers"))
from oidc import OidcProvider, sleep_until_expired, tamper_signature, unverified_claims, unverified_header  # noqa: E402

ALICE = "alice@example.com"


@pytest.fixture(scope="module")
def providers():
    """A long-lived and a short-lived provider, started side by side (each
    takes a second or so to start)."""
    with ThreadPoolExecutor(2) as pool:
        started = [pool.submit(OidcProvider), pool.submit(OidcProvider, token_max_age=1)]
    failed = [f.exception() for f in started if f.exception()]
    idps = [f.result() for f in started if not f.exception()]
    if failed:
        for idp in idps:
            idp.stop()
        raise failed[0]
    yield idps
    for idp in idps:
        idp.stop()


@pytest.fixture
def idp(providers):
    return providers[0]


def verify(idp: OidcProvider, token: str, client_id: str = "warden") -> dict:
    """The claims of `token` once its signature, issuer, audience and expiry check out."""
    decoded = jwt.decode(token, KeySet.import_key_set(idp.jwks()), algorithms=["RS256"])
    jwt.JWTClaimsRegistry(
        iss={"essential": True, "value": idp.issuer},
        aud={"essential": True, "value": client_id},
        exp={"essential": True},
        sub={"essential": True},
    ).validate(decoded.claims)
    return decoded.claims


def test_id_token_verifies_against_the_providers_keys(idp):
    token = idp.id_token(ALICE, groups=["dba"], email=ALICE, name="Alice Liddell")
    assert unverified_header(token)["alg"] == "RS256"
    claims = verify(idp, token)
    assert claims["iss"] == idp.issuer == idp.discovery["issuer"]
    assert claims["aud"] == ["warden"]
    assert claims["sub"] == ALICE
    assert claims["groups"] == ["dba"]
    assert claims["email"] == ALICE
    assert claims["name"] == "Alice Liddell"
    assert claims["exp"] - claims["iat"] == 3600
    assert abs(claims["iat"] - time.time()) < 60


def test_claims_are_replaced_for_each_token(idp):
    idp.id_token(ALICE, groups=["dba", "oncall"], extra={"team": "data"})
    claims = unverified_claims(idp.id_token(ALICE, groups=None))
    assert "groups" not in claims and "team" not in claims and "email" not in claims


def test_tampered_signature_does_not_verify(idp):
    token = idp.id_token(ALICE, groups=["dba"])
    bad = tamper_signature(token)
    assert bad != token and bad.rsplit(".", 1)[0] == token.rsplit(".", 1)[0]
    with pytest.raises(BadSignatureError):
        verify(idp, bad)


def test_token_for_another_client_has_the_wrong_audience(idp):
    token = idp.id_token(ALICE, client_id="someone-else")
    assert unverified_claims(token)["aud"] == ["someone-else"]
    with pytest.raises(InvalidClaimError, match="aud"):
        verify(idp, token)


def test_extra_claims_override_issuer_and_expiry(idp):
    """Signed by the provider, yet from another issuer, or expired, without waiting."""
    with pytest.raises(InvalidClaimError, match="iss"):
        verify(idp, idp.id_token(ALICE, extra={"iss": "http://127.0.0.1:1"}))
    with pytest.raises(ExpiredTokenError):
        verify(idp, idp.id_token(ALICE, extra={"exp": int(time.time()) - 60}))


def test_expiry_follows_token_max_age(providers):
    short = providers[1]
    token = short.id_token(ALICE, groups=["dba"])
    claims = unverified_claims(token)
    assert claims["exp"] - claims["iat"] == 1
    sleep_until_expired(token)
    with pytest.raises(ExpiredTokenError):
        verify(short, token)
