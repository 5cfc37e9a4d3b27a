"""JWTs from the operator's identity provider: verified with pyjwt, mapped to a Principal.

* Algorithms are pinned by the config (``auth.jwt.algorithms``: HS256, RS256, ES256). The
  token's ``alg`` header picks the key *type*, never the key: HS256 is verified only with the
  configured secret, RS256/ES256 only with a JWKS key of the matching type (``kty`` RSA / EC
  P-256). So ``alg: none`` and an HS256 token "signed" with the RSA public key are both refused
  (``token_algorithm_not_allowed`` when the algorithm is not pinned; ``invalid_token`` when it
  is pinned but the signature does not verify with the configured secret).
* ``iss``, ``aud`` and ``exp`` are required; ``nbf``/``iat`` in the future are refused.
* The JWKS file is re-read when its modification time or size changes (checked at most once a
  second, and at once for an unknown ``kid``); a broken file keeps the previous keys.
* Claims: ``account_claim`` (default ``sub``) names the account, ``scopes_claim`` (a
  space-separated string or a list; unknown scopes ignored; absent = ``default_scopes``), and
  ``models_claim`` (optional list) the model pool.

Each refusal has its own code (errors.py): invalid_token, token_algorithm_not_allowed,
token_expired, token_not_yet_valid, invalid_issuer, invalid_audience.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

import jwt
import structlog

from .config import SCOPES, Jwt
from .errors import GatewayError
from .keys import ACCOUNT_RE

log = structlog.get_logger("tollgate.jwt")

_KTY = {"RS256": ("RSA", None), "ES256": ("EC", "P-256")}


def _err(code: str, message: str) -> GatewayError:
    return GatewayError(code, message)


def looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2 and token.startswith("ey")


class JwtVerifier:
    def __init__(self, cfg: Jwt) -> None:
        self.cfg = cfg
        self._secret = cfg.secret()
        self._keys: dict[str, tuple[str, str | None, Any]] = {}  # kid -> (kty, crv, key)
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        if cfg.jwks_file:
            self._reload(force=True)

    # ------------------------------------------------------------------ JWKS
    def _reload(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < 1.0:
            return
        self._checked = now
        path = self.cfg.jwks_file
        assert path is not None
        try:
            st = os.stat(path)
        except OSError as exc:
            log.warning("jwks_unreadable", path=path, error=exc.strerror)
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        try:
            with open(path, "rb") as f:
                data = json.load(f)
            keys: dict[str, tuple[str, str | None, Any]] = {}
            for i, jwk in enumerate(data["keys"]):
                if jwk.get("use", "sig") != "sig":
                    continue
                kid = str(jwk.get("kid", f"#{i}"))
                keys[kid] = (jwk["kty"], jwk.get("crv"), jwt.PyJWK(jwk).key)
        except (OSError, ValueError, KeyError, TypeError, jwt.PyJWTError) as exc:
            log.warning("jwks_invalid", path=path, error=str(exc)[:200])
            return
        self._keys, self._stamp = keys, stamp
        log.info("jwks_loaded", path=path, keys=len(keys))

    def _public_key(self, alg: str, kid: Any) -> Any:
        self._reload()
        if kid is not None and str(kid) not in self._keys:
            self._reload(force=True)
        kty, crv = _KTY[alg]
        if kid is None:
            fitting = [k for k in self._keys.values() if k[0] == kty and k[1] == crv]
            if len(fitting) != 1:
                raise _err("invalid_token", "The token names no key ('kid') and several fit.")
            return fitting[0][2]
        found = self._keys.get(str(kid))
        if found is None:
            raise _err(
                "invalid_token", "The token is signed with a key this gateway does not know."
            )
        if (found[0], found[1]) != (kty, crv):
            raise _err(
                "token_algorithm_not_allowed",
                f"The token's algorithm {alg} does not match its key's type.",
            )
        return found[2]

    # ------------------------------------------------------------------ verify
    def verify(self, token: str) -> dict[str, Any]:
        """The verified claims, or raise the GatewayError the client gets (401)."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _err("invalid_token", "The token is not a well-formed JWT.") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.cfg.algorithms:
            raise _err(
                "token_algorithm_not_allowed",
                f"Tokens signed with {str(alg)[:16]!r} are not accepted"
                f" (accepted: {', '.join(self.cfg.algorithms)}).",
            )
        if alg == "HS256":
            key: Any = self._secret
            if not key:
                raise _err("invalid_token", "HS256 tokens cannot be verified: no secret is set.")
        else:
            key = self._public_key(alg, header.get("kid"))
        try:
            return jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self.cfg.audience,
                issuer=self.cfg.issuer,
                leeway=self.cfg.leeway_s,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise _err("token_expired", "The token has expired.") from None
        except jwt.ImmatureSignatureError:
            raise _err("token_not_yet_valid", "The token is not valid yet (nbf/iat).") from None
        except jwt.InvalidAudienceError:
            raise _err(
                "invalid_audience", "The token is not meant for this gateway (aud)."
            ) from None
        except jwt.InvalidIssuerError:
            raise _err(
                "invalid_issuer", "The token comes from an issuer this gateway does not trust."
            ) from None
        except jwt.MissingRequiredClaimError as exc:
            raise _err("invalid_token", f"The token has no '{exc.claim}' claim.") from None
        except jwt.PyJWTError:
            raise _err("invalid_token", "The token's signature does not verify.") from None

    def claims_to_identity(
        self, claims: dict[str, Any]
    ) -> tuple[str, frozenset[str], frozenset[str] | None, float, str]:
        """(account, scopes, model pool or None, expiry, subject hash) from verified claims."""
        cfg = self.cfg
        account = claims.get(cfg.account_claim)
        if not isinstance(account, str) or not ACCOUNT_RE.match(account):
            raise _err(
                "invalid_token",
                f"The token's '{cfg.account_claim}' claim must name an account"
                " (letters, digits, '.', '_', '-').",
            )
        raw = claims.get(cfg.scopes_claim)
        if raw is None:
            scopes = frozenset(cfg.default_scopes)
        elif isinstance(raw, str):
            scopes = frozenset(s for s in raw.split() if s in SCOPES)
        elif isinstance(raw, list):
            scopes = frozenset(s for s in raw if isinstance(s, str) and s in SCOPES)
        else:
            raise _err("invalid_token", f"The token's '{cfg.scopes_claim}' claim is malformed.")
        models: frozenset[str] | None = None
        if cfg.models_claim and cfg.models_claim in claims:
            pool = claims[cfg.models_claim]
            if not isinstance(pool, list) or not all(isinstance(m, str) for m in pool):
                raise _err("invalid_token", f"The token's '{cfg.models_claim}' claim is malformed.")
            models = frozenset(pool)
        subject = f"{claims.get('iss', '')}|{claims.get('sub', account)}"
        digest = hashlib.sha256(subject.encode()).hexdigest()
        return account, scopes, models, float(claims["exp"]), digest
