"""A real OpenID Connect provider for the approval tests: oidc-provider-mock
(tests/requirements.txt) in a subprocess on 127.0.0.1 only.

The agent verifies reviewers' ID tokens against the issuer's discovery
document and JWKS, so the tests need a provider that serves both and signs
real RS256 tokens with a key nobody else has; a hand-made JWT would only
test what the test author believes about OIDC. It runs in its own process
(not a thread of pytest) so that it is stopped like any other peer and a
test that stalls the pytest process does not stall the provider the agent is
talking to.

    with OidcProvider() as idp:
        # approvals.oidc.issuer: idp.issuer, client_id: "warden"
        token = idp.id_token("alice@example.com", groups=["dba"])

What the provider puts in an ID token (oidc-provider-mock 0.3.4 with
authlib): header {"typ": "JWT", "alg": "RS256"} and no "kid" (its JWKS has
one key, which has a kid); claims iss, aud (a list: ["warden"]), iat, exp
(iat + token_max_age), auth_time, at_hash, sub, and the user's claims:
`groups` and any non-standard claim always, `email` and `name` because the
flow asks for the "email" and "profile" scopes.

Tokens to be refused, for the refusal tests:

- bad signature: `tamper_signature(token)`;
- wrong audience: `idp.id_token(sub, client_id="someone-else")`, a genuine
  token issued to another client;
- expired: from `OidcProvider(token_max_age=1)`, then
  `sleep_until_expired(token)` (about 1 s; or sleep 2 s). Without waiting:
  `idp.id_token(sub, extra={"exp": int(time.time()) - 60})`, because the
  provider lets the user's claims override the registered ones;
- wrong issuer, still signed by the provider's key:
  `idp.id_token(sub, extra={"iss": "http://127.0.0.1:1"})`.
  (`extra` overrides iss, aud, iat and exp, never sub.)
"""
import base64
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import httpx

# The provider accepts any client id and, at the token endpoint, any
# non-empty secret (client_secret_basic or client_secret_post); a request
# without one ("none") is refused with invalid_client.
CLIENT_SECRET = "any-secret"
# Never fetched: the code is read from the authorization response's Location.
REDIRECT_URI = "http://127.0.0.1:1/cb"
# "email" and "profile" let the standard claims email and name through to the
# ID token; non-standard ones such as groups come with any scope. The provider
# knows no "groups" scope (it would drop it silently).
SCOPE = "openid email profile"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _b64decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _parts(token: str) -> list[str]:
    parts = token.split(".")
    if len(parts) != 3 or not all(parts):
        raise ValueError("not a compact JWS (header.payload.signature)")
    return parts


def unverified_header(token: str) -> dict:
    """The JOSE header of `token`, not verified."""
    return json.loads(_b64decode(_parts(token)[0]))


def unverified_claims(token: str) -> dict:
    """The claims of `token`, not verified: for asserting what a test sent."""
    return json.loads(_b64decode(_parts(token)[1]))


def tamper_signature(token: str) -> str:
    """`token` with one bit of its signature flipped: still well-formed
    (canonical base64url, same header and claims), but no longer verifies."""
    header, payload, signature = _parts(token)
    sig = bytearray(_b64decode(signature))
    sig[len(sig) // 2] ^= 0x01
    return f"{header}.{payload}.{_b64encode(bytes(sig))}"


def sleep_until_expired(token: str, margin: float = 0.2) -> None:
    """Sleep until `token`'s exp has passed (exp is whole seconds; a
    verifier treats exp <= now as expired), plus `margin` seconds."""
    delay = unverified_claims(token)["exp"] - time.time() + margin
    if delay > 0:
        time.sleep(delay)


class OidcProvider:
    """One oidc-provider-mock process on 127.0.0.1. Started by the
    constructor; stopped by `stop()` or at the end of a `with` block.

    `token_max_age`: seconds until the ID tokens (and access tokens) it
    issues expire; whole seconds, as its command line takes them."""

    def __init__(self, token_max_age: float = 3600):
        if token_max_age < 1 or token_max_age != int(token_max_age):
            raise ValueError(f"token_max_age must be a whole number of seconds >= 1, not {token_max_age!r}")
        if importlib.util.find_spec("oidc_provider_mock") is None:
            raise RuntimeError(
                f"oidc_provider_mock is not installed for {sys.executable}: "
                "pip install -r tests/requirements.txt (cargo xtask setup does)"
            )
        self.token_max_age = int(token_max_age)
        self.port = _free_port()
        # The provider takes its issuer from the Host of each request, so the
        # agent and this fixture must both reach it by this exact URL.
        self.issuer = f"http://127.0.0.1:{self.port}"
        self.dir = Path(tempfile.mkdtemp(prefix="warden-oidc."))
        self.log = self.dir / "provider.log"
        # Loopback only; no proxy from the environment (trust_env=False).
        self._http = httpx.Client(base_url=self.issuer, trust_env=False, timeout=10, follow_redirects=False)
        env = {k: v for k, v in os.environ.items() if k != "FORCE_COLOR"}
        env["NO_COLOR"] = "1"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "oidc_provider_mock", "--host", "127.0.0.1", "--port", str(self.port),
                 "--token-max-age", str(self.token_max_age)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            )
        try:
            self.discovery = self._wait_ready()
            if self.discovery.get("issuer") != self.issuer:
                raise RuntimeError(f"the provider says its issuer is {self.discovery.get('issuer')!r}, not {self.issuer!r}")
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float = 20) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"oidc-provider-mock exited ({self.proc.returncode}):\n{self._log_tail()}")
            try:
                r = self._http.get("/.well-known/openid-configuration")
                if r.status_code == 200:
                    return r.json()
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"oidc-provider-mock did not answer within {timeout} s:\n{self._log_tail()}")

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def jwks(self) -> dict:
        """The provider's JSON Web Key Set, as the agent reads it."""
        r = self._http.get(self.discovery["jwks_uri"])
        r.raise_for_status()
        return r.json()

    def set_user(self, sub: str, *, groups=(), email: str | None = None, name: str | None = None,
                 extra: dict | None = None) -> None:
        """Replace the claims the provider gives `sub` when it next signs in,
        through its user API (`PUT /users/<sub>`): `groups` (a JSON list;
        None leaves the claim out), `email`, `name` when given, then `extra`
        merged over them. For a browser sign-in, call it before the user
        types `sub` into the provider's form. `sub` must not contain "/"."""
        claims: dict = {}
        if groups is not None:
            claims["groups"] = list(groups)
        if email is not None:
            claims["email"] = email
        if name is not None:
            claims["name"] = name
        claims.update(extra or {})
        r = self._http.put(f"/users/{urllib.parse.quote(sub, safe='@')}", json=claims)
        self._check(r, 204, "setting the user's claims")

    def id_token(self, sub: str, *, client_id: str = "warden", groups=(), email: str | None = None,
                 name: str | None = None, extra: dict | None = None, nonce: str | None = None) -> str:
        """Sign `sub` in to `client_id` with the authorization-code flow and
        return the raw ID token.

        The user's claims are replaced first, as `set_user` does: `groups`
        (a JSON list; None leaves the claim out), `email`, `name` when given,
        then `extra` merged over them. `sub` must not contain "/" (it is a
        path segment of the provider's user API). Not for concurrent use with
        the same `sub`."""
        self.set_user(sub, groups=groups, email=email, name=name, extra=extra)

        state = f"s{time.monotonic_ns()}"
        params = {"client_id": client_id, "response_type": "code", "redirect_uri": REDIRECT_URI, "scope": SCOPE,
                  "state": state}
        if nonce is not None:
            params["nonce"] = nonce
        r = self._http.post(self.discovery["authorization_endpoint"], params=params, data={"sub": sub})
        self._check(r, 302, "authorizing")
        query = urllib.parse.parse_qs(urllib.parse.urlparse(r.headers["location"]).query)
        if query.get("state") != [state] or "code" not in query:
            raise RuntimeError(f"authorizing: unexpected redirect {r.headers['location']}")

        r = self._http.post(
            self.discovery["token_endpoint"],
            data={"grant_type": "authorization_code", "code": query["code"][0], "redirect_uri": REDIRECT_URI},
            auth=(client_id, CLIENT_SECRET),
        )
        self._check(r, 200, "exchanging the code")
        return r.json()["id_token"]

    @staticmethod
    def _check(r: httpx.Response, status: int, doing: str):
        if r.status_code != status:
            raise RuntimeError(f"{doing}: {r.request.method} {r.request.url} answered {r.status_code}: {r.text[:500]}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._http.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "OidcProvider":
        return self

    def __exit__(self, *exc):
        self.stop()
