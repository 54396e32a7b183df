"""A real token service for tests: an RSA key, its JWKS file, and signed SMART access tokens."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

ISSUER = "https://idp.hospital.example"
AUDIENCE = "pneumo-gateway"


class TokenService:
    def __init__(self, directory: Path, kid: str = "test-key-1") -> None:
        self.kid = kid
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        jwk.update({"kid": kid, "use": "sig", "alg": "RS256"})
        directory.mkdir(parents=True, exist_ok=True)
        self.jwks_file = directory / "jwks.json"
        self.jwks_file.write_text(json.dumps({"keys": [jwk]}))

    def auth_settings(self) -> dict[str, Any]:
        return {"mode": "jwt", "issuer": ISSUER, "audience": AUDIENCE, "jwks_file": str(self.jwks_file)}

    def token(self, scope: str = "system/*.read", *, client_id: str = "ehr-backend", ttl: float = 300,
              **claims: Any) -> str:
        now = int(time.time())
        payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": client_id, "client_id": client_id, "scope": scope,
                   "iat": now, "exp": now + int(ttl), "jti": f"{client_id}-{now}-{scope}"}
        payload.update(claims)
        return jwt.encode(payload, self.key, algorithm="RS256", headers={"kid": self.kid})

    def headers(self, scope: str = "system/*.read", **claims: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(scope, **claims)}"}
