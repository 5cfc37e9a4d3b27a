"""JWTs: HS256 with a secret, RS256/ES256 from a JWKS file (re-read on change), Bearer or cookie;
each way a token can be wrong is refused with 401 and its own code."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import openai
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from extproc.config import parse_config
from extproc.errors import GatewayError
from extproc.jwt_auth import JwtVerifier
from tests.harness import SECRETS, Gateway, base_config, start_gateway

ISS, AUD = "https://id.example.test", "tollgate"
HS_SECRET = "test-hs256-secret-" + "s" * 24
SECRETS.append(HS_SECRET)
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
HELLO = [{"role": "user", "content": "hi"}]


def _jwk(key: Any, kid: str, alg: str) -> dict[str, Any]:
    algo = jwt.algorithms.RSAAlgorithm if alg == "RS256" else jwt.algorithms.ECAlgorithm
    out = json.loads(algo.to_jwk(key.public_key()))
    out.update(kid=kid, use="sig", alg=alg)
    return out


def write_jwks(path: Path, *entries: tuple[Any, str, str]) -> None:
    path.write_text(json.dumps({"keys": [_jwk(k, kid, alg) for k, kid, alg in entries]}))


def claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    out = {"iss": ISS, "aud": AUD, "sub": "user-1", "org": "jwt-org", "iat": now, "exp": now + 300}
    out.update(over)
    return {k: v for k, v in out.items() if v is not None}


def token(alg: str = "HS256", kid: str | None = None, **over: Any) -> str:
    key: Any = {"HS256": HS_SECRET, "RS256": RSA_KEY, "ES256": EC_KEY}[alg]
    headers = (
        {"kid": kid or {"RS256": "rsa-1", "ES256": "ec-1"}.get(alg)} if alg != "HS256" else None
    )
    raw = jwt.encode(claims(**over), key, algorithm=alg, headers=headers)
    SECRETS.append(raw)
    return raw


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: dict[str, Any], payload: dict[str, Any], secret: bytes | None = None) -> str:
    head = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(payload).encode())
    sig = _b64(hmac.new(secret, head.encode(), hashlib.sha256).digest()) if secret else ""
    return f"{head}.{sig}"


def rsa_public_pem() -> bytes:
    return RSA_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def jwt_config(jwks: Path, algorithms: list[str] | None = None) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "issuer": ISS,
        "audience": AUD,
        "algorithms": algorithms or ["HS256", "RS256", "ES256"],
        "jwks_file": str(jwks),
        "cookie": "tg_session",
        "account_claim": "org",
        "models_claim": "models",
    }
    if "HS256" in cfg["algorithms"]:
        cfg["hs256_secret"] = HS_SECRET
    return cfg


# --------------------------------------------------------------------------- the verifier alone


def verifier(tmp_path: Path, algorithms: list[str] | None = None) -> JwtVerifier:
    jwks = tmp_path / "jwks.json"
    write_jwks(jwks, (RSA_KEY, "rsa-1", "RS256"), (EC_KEY, "ec-1", "ES256"))
    config = base_config()
    config["auth"] = {"jwt": jwt_config(jwks, algorithms)}
    cfg = parse_config(config)
    assert cfg.auth.jwt is not None
    return JwtVerifier(cfg.auth.jwt)


def refusal(v: JwtVerifier, raw: str) -> str:
    with pytest.raises(GatewayError) as exc:
        v.verify(raw)
    assert exc.value.status == 401
    return exc.value.code


@pytest.mark.parametrize("alg", ["HS256", "RS256", "ES256"])
def test_valid_tokens_verify(tmp_path: Path, alg: str) -> None:
    v = verifier(tmp_path)
    got = v.claims_to_identity(v.verify(token(alg, scope="models:use keys:manage bogus")))
    account, scopes, models, exp, _ = got
    assert account == "jwt-org" and scopes == {"models:use", "keys:manage"} and models is None
    assert exp > time.time()


def test_each_refusal_has_its_code(tmp_path: Path) -> None:
    v = verifier(tmp_path)
    payload = claims()
    assert refusal(v, unsigned({"alg": "none", "typ": "JWT"}, payload)) == (
        "token_algorithm_not_allowed"
    )
    assert refusal(v, unsigned({"alg": "HS512"}, payload, b"x" * 32)) == (
        "token_algorithm_not_allowed"
    )
    # HS256 "signed" with the RSA public key: verified only with the configured secret
    confused = unsigned({"alg": "HS256", "typ": "JWT"}, payload, rsa_public_pem())
    assert refusal(v, confused) == "invalid_token"
    # RS256 header on the EC key's kid: the key type must match the algorithm
    assert refusal(v, token("RS256", kid="ec-1")) == "token_algorithm_not_allowed"
    assert refusal(v, token(iss="https://evil.test")) == "invalid_issuer"
    assert refusal(v, token(aud="someone-else")) == "invalid_audience"
    assert refusal(v, token(exp=int(time.time()) - 10)) == "token_expired"
    assert refusal(v, token(nbf=int(time.time()) + 600)) == "token_not_yet_valid"
    assert refusal(v, token(exp=None)) == "invalid_token"
    assert refusal(v, token("RS256", kid="unknown")) == "invalid_token"
    head, body, sig = token("RS256").split(".")
    forged = json.loads(base64.urlsafe_b64decode(body + "=="))
    forged["org"] = "someone-else"
    assert refusal(v, f"{head}.{_b64(json.dumps(forged).encode())}.{sig}") == "invalid_token"
    assert refusal(v, "eyJhbGciOi.garbage.x") == "invalid_token"


def test_hs_rs_confusion_when_only_rs256_is_pinned(tmp_path: Path) -> None:
    v = verifier(tmp_path, ["RS256"])
    confused = unsigned({"alg": "HS256", "typ": "JWT"}, claims(), rsa_public_pem())
    assert refusal(v, confused) == "token_algorithm_not_allowed"
    assert v.verify(token("RS256"))["org"] == "jwt-org"


def test_jwks_file_is_reread_when_it_changes(tmp_path: Path) -> None:
    v = verifier(tmp_path)
    new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raw = jwt.encode(claims(), new_key, algorithm="RS256", headers={"kid": "rsa-2"})
    assert refusal(v, raw) == "invalid_token"
    write_jwks(tmp_path / "jwks.json", (new_key, "rsa-2", "RS256"))
    time.sleep(1.05)  # the file is checked at most once a second
    assert v.verify(raw)["org"] == "jwt-org"


def test_config_refuses_none_and_weak_secrets() -> None:
    from extproc.config import ConfigError

    config = base_config()
    for jwt_cfg, problem in (
        ({"algorithms": ["none"]}, "never 'none'"),
        ({"algorithms": ["HS256"], "hs256_secret": "short"}, "at least 32"),
        ({"algorithms": ["RS256"]}, "JWKS"),
    ):
        config["auth"] = {"jwt": {"issuer": ISS, "audience": AUD, **jwt_cfg}}
        with pytest.raises(ConfigError, match=problem):
            parse_config(config)


# --------------------------------------------------------------------------- through the gateway


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("jwt")
    jwks = tmp / "jwks.json"
    write_jwks(jwks, (RSA_KEY, "rsa-1", "RS256"), (EC_KEY, "ec-1", "ES256"))
    config = base_config()
    config["auth"]["jwt"] = jwt_config(jwks)
    gw = start_gateway(tmp, config)
    from tests.harness import grant

    grant(str(gw.stack.config_path), "jwt-org", "50")
    try:
        yield gw
    finally:
        gw.stack.stop()


def test_bearer_jwt_calls_models_with_the_openai_sdk(gw: Gateway) -> None:
    for alg in ("HS256", "RS256", "ES256"):
        client = openai.OpenAI(base_url=gw.v1, api_key=token(alg), max_retries=0)
        reply = client.chat.completions.with_raw_response.create(
            model="sim-chat",
            messages=HELLO,  # type: ignore[arg-type]
            max_tokens=2,
        )
        assert reply.http_response.status_code == 200
    credits = httpx.get(gw.v1 + "/credits", headers={"Authorization": f"Bearer {token()}"})
    assert credits.json()["account"] == "jwt-org"


def test_cookie_jwt(gw: Gateway) -> None:
    r = httpx.get(gw.v1 + "/models", headers={"Cookie": f"theme=dark; tg_session={token()}"})
    assert r.status_code == 200 and r.json()["data"]


def test_claims_map_to_scopes_and_pool(gw: Gateway) -> None:
    reader = openai.OpenAI(base_url=gw.v1, api_key=token(scope="usage:read"), max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        reader.chat.completions.create(model="sim-chat", messages=HELLO)  # type: ignore[arg-type]
    pooled = openai.OpenAI(base_url=gw.v1, api_key=token(models=["sim-embed"]), max_retries=0)
    assert [m.id for m in pooled.models.list()] == ["sim-embed"]
    with pytest.raises(openai.PermissionDeniedError):
        pooled.chat.completions.create(model="sim-chat", messages=HELLO)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("make", "code"),
    [
        (lambda: unsigned({"alg": "none"}, claims()), "token_algorithm_not_allowed"),
        (lambda: unsigned({"alg": "HS256"}, claims(), rsa_public_pem()), "invalid_token"),
        (lambda: token(aud="other"), "invalid_audience"),
        (lambda: token(iss="https://evil.test"), "invalid_issuer"),
        (lambda: token("ES256", exp=int(time.time()) - 1), "token_expired"),
        (lambda: token(nbf=int(time.time()) + 600), "token_not_yet_valid"),
        (lambda: token()[:-4] + "AAAA", "invalid_token"),
    ],
)
def test_gateway_refuses_bad_tokens_with_their_code(gw: Gateway, make: Any, code: str) -> None:
    raw = make()
    SECRETS.append(raw)
    r = httpx.post(
        gw.v1 + "/chat/completions",
        headers={"Authorization": f"Bearer {raw}"},
        json={"model": "sim-chat", "messages": HELLO},
    )
    assert r.status_code == 401
    assert r.json()["error"]["code"] == code
    assert r.json()["error"]["type"] == "authentication_error"
