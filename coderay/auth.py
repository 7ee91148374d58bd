"""Who may call the HTTP API: per-provider API keys, clients a provider admits, and the operator.

Keys come from a secrets file (`serving.auth.keys_file`, or the file `CODERAY_KEYS_FILE` names) and from the
environment (`CODERAY_OPERATOR_KEY`, `CODERAY_KEY_<SERVICE>` for a service's provider); they are hashed on
load and only digests are kept, compared in constant time, never logged, echoed or returned. A request
carries its key as `Authorization: Bearer <key>` or `X-API-Key: <key>`.

- `infer` on a service: its provider's key, a client's key that lists the service, or the operator's;
- route changes, `/v1/debug/*` and `/v1/controller`: the operator's key only;
- other reads (`/v1/services`, a service's paths and route): any valid key; `/healthz` and the docs: anyone.
Missing or unknown key: 401; a valid key not allowed: 403 (both with a JSON reason, `deployments.schemas`).

The secrets file (YAML):

    operator: [<key>, ...]
    providers: {digits: [<key>], mnist: [<key>]}         # a provider's keys, by the service it owns
    clients: {alice: {keys: [<key>], services: [digits]}} # a client the providers of `services` admit
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from coderay.config import CoderayConfig
from coderay.errors import ConfigError

__all__ = ["KEYS_FILE_ENV", "OPERATOR_ENV", "KeyRing", "Principal", "Denied", "load_keyring", "digest", "provider_env"]

KEYS_FILE_ENV = "CODERAY_KEYS_FILE"
OPERATOR_ENV = "CODERAY_OPERATOR_KEY"
MIN_KEY_LEN = 16


def provider_env(service: str) -> str:
    """The environment variable holding the key of `service`'s provider."""
    return "CODERAY_KEY_" + service.upper().replace("-", "_").replace(".", "_")


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Whom a key belongs to: the operator, a service's provider, or a client admitted to some services."""

    kind: str  # "operator" | "provider" | "client"
    name: str
    services: frozenset[str] = frozenset()


class Denied(Exception):
    """A request the keys do not allow: `status` 401 (no or unknown key) or 403 (known, not allowed)."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclass(frozen=True)
class KeyRing:
    """Key digests → principals; `enabled` False lets every request through (the demo's default)."""

    enabled: bool
    principals: tuple[tuple[str, Principal], ...] = field(default=(), repr=False)

    def who(self, key: str | None) -> Principal:
        """The principal of `key`, every digest compared (constant time per digest, no early exit)."""
        if not key:
            raise Denied(401, "an API key is required: send `Authorization: Bearer <key>` or `X-API-Key: <key>`")
        d, found = digest(key), None
        for known, principal in self.principals:
            if hmac.compare_digest(d, known) and found is None:
                found = principal
        if found is None:
            raise Denied(401, "unknown API key")
        return found

    def check(self, key: str | None, action: str, service: str | None = None) -> Principal | None:
        """Allow `action` ("infer", "read", "operate") on `service`, or raise Denied; None when auth is off."""
        if not self.enabled:
            return None
        p = self.who(key)
        if p.kind == "operator" or action == "read":
            return p
        if action == "infer" and service is not None and service in p.services:
            return p
        what = f"infer on {service!r}" if action == "infer" else "this operator action"
        raise Denied(403, f"{p.kind} {p.name!r} may not {what}")

    def as_args(self) -> dict:
        """Digests and principals only (what the ingress is built with): no key leaves the process that read it."""
        return {
            "enabled": self.enabled,
            "principals": [[d, p.kind, p.name, sorted(p.services)] for d, p in self.principals],
        }

    @classmethod
    def from_args(cls, args: Mapping) -> KeyRing:
        return cls(
            bool(args["enabled"]),
            tuple((d, Principal(kind, name, frozenset(svcs))) for d, kind, name, svcs in args["principals"]),
        )


def _keys(value: object, where: str) -> list[str]:
    keys = [value] if isinstance(value, str) else value
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise ConfigError(f"{where}: expected a key or a list of keys")
    short = [i for i, k in enumerate(keys) if len(k) < MIN_KEY_LEN]
    if short:
        raise ConfigError(f"{where}[{short[0]}]: a key must be at least {MIN_KEY_LEN} characters")
    return keys


def _from_file(path: Path, services: Iterable[str]) -> list[tuple[str, Principal]]:
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the keys file ({type(e).__name__})") from None
    if not isinstance(doc, dict) or set(doc) - {"operator", "providers", "clients"}:
        raise ConfigError(f"{path}: expected a mapping with operator, providers and clients")
    known = set(services)
    out = [(digest(k), Principal("operator", "operator")) for k in _keys(doc.get("operator", []), f"{path}: operator")]
    for svc, keys in (doc.get("providers") or {}).items():
        if svc not in known:
            raise ConfigError(f"{path}: providers.{svc}: no such service; expected one of {sorted(known)}")
        out += [
            (digest(k), Principal("provider", svc, frozenset({svc}))) for k in _keys(keys, f"{path}: providers.{svc}")
        ]
    for name, client in (doc.get("clients") or {}).items():
        if not isinstance(client, dict) or not isinstance(client.get("services"), list):
            raise ConfigError(f"{path}: clients.{name}: expected {{keys: [...], services: [...]}}")
        unknown = set(client["services"]) - known
        if unknown:
            raise ConfigError(f"{path}: clients.{name}.services: no such service {sorted(unknown)}")
        out += [
            (digest(k), Principal("client", str(name), frozenset(client["services"])))
            for k in _keys(client.get("keys", []), f"{path}: clients.{name}.keys")
        ]
    return out


def load_keyring(cfg: CoderayConfig, environ: Mapping[str, str] | None = None) -> KeyRing:
    """The keys of `cfg`'s deployment: off unless `serving.auth.enabled`; then from the keys file and the
    environment, at least one operator key required (else nobody could change a route)."""
    env = os.environ if environ is None else environ
    if not cfg.serving.auth.enabled:
        return KeyRing(False)
    services = [s.name for s in cfg.services]
    principals: list[tuple[str, Principal]] = []
    path = cfg.serving.auth.keys_file or env.get(KEYS_FILE_ENV)
    if path:
        principals += _from_file(Path(path).expanduser(), services)
    if env.get(OPERATOR_ENV):
        principals += [(digest(k), Principal("operator", "operator")) for k in _keys(env[OPERATOR_ENV], OPERATOR_ENV)]
    for svc in services:
        if env.get(provider_env(svc)):
            principals += [
                (digest(k), Principal("provider", svc, frozenset({svc})))
                for k in _keys(env[provider_env(svc)], provider_env(svc))
            ]
    if not any(p.kind == "operator" for _, p in principals):
        raise ConfigError(
            f"serving.auth.enabled: no operator key; set {OPERATOR_ENV} or list `operator` keys in "
            f"the keys file (serving.auth.keys_file or {KEYS_FILE_ENV})"
        )
    return KeyRing(True, tuple(principals))
