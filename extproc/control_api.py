"""The control API (``protos/tollgate/admin/v1/admin.proto``), served as gRPC by every worker.

REST clients reach it through Envoy: the processor authenticates the request like any other
(same cache, same failed-lookup limit, same error shape), Envoy's gRPC-JSON transcoder turns it
into a gRPC call to a worker, and the processor turns gRPC errors back into the gateway's error
shape (control_routes.py). gRPC clients call a worker's port directly. Either way this module
authenticates the call itself from its ``authorization`` (or cookie) metadata, so a call that
did not come through Envoy is checked just the same.

Who may do what:

=================================  ==============================================================
keys: create, list, get, update,   ``keys:manage``, in the caller's own account. A key can only
revoke                             be given scopes and models the caller has, and limits no
                                   looser than the caller's own.
credits, transactions, usage       ``usage:read``, the caller's own account
accounts: get                      ``usage:read``, the caller's own account
grant credits; accounts: create,   the operator only (the bootstrap admin key, or a credential
list, update (limits)              of ``auth.admin_account``) with ``credits:manage`` (grants)
                                   or ``keys:manage`` (accounts)
=================================  ==============================================================

The operator may name any account where the caller's own is the default. Another account's key
is "not found" to a tenant (no existence oracle); naming another account is 403.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import redis.asyncio as aioredis
import redis.exceptions
import structlog
from google.protobuf import json_format, struct_pb2

from . import account_api, keys, store
from .account_api import iso, parse_time
from .auth import Authenticator, Principal, announce
from .config import DEFAULT_SCOPES, GatewayConfig
from .control_routes import ERROR_CODE_KEY, ERROR_PARAM_KEY
from .errors import GatewayError, invalid
from .ledger import Ledger
from .money import format_credits, parse_credits
from .proto import admin_pb2 as pb
from .proto import admin_pb2_grpc

log = structlog.get_logger("tollgate.control")

_GRPC_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    402: grpc.StatusCode.FAILED_PRECONDITION,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    405: grpc.StatusCode.UNIMPLEMENTED,
    409: grpc.StatusCode.ALREADY_EXISTS,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}
_KEY_NOT_FOUND = "No key with this id."

T = TypeVar("T")


def _rpc(
    fn: Callable[[ControlApi, Any, Principal], Awaitable[T]],
) -> Callable[[ControlApi, Any, Any], Awaitable[T]]:
    """Authenticate the call, run it, and turn a GatewayError into a gRPC status carrying the
    gateway's code (trailing metadata), which the processor renders for REST clients."""

    @functools.wraps(fn)
    async def handler(self: ControlApi, request: Any, context: Any) -> T:
        try:
            principal = await self.principal(context)
            return await fn(self, request, principal)
        except GatewayError as err:
            error = err
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            error = GatewayError("gateway_unavailable", "The gateway's store is unreachable.")
        except Exception:
            log.exception("control_api_error", rpc=fn.__name__)
            error = GatewayError("internal_error", "The control API failed.")
        metadata = [(ERROR_CODE_KEY, error.code)]
        if error.param:
            metadata.append((ERROR_PARAM_KEY, error.param))
        if error.retry_after is not None:
            metadata.append(("retry-after", str(error.retry_after)))
        code = _GRPC_CODES.get(error.status, grpc.StatusCode.INTERNAL)
        await context.abort(code, error.message, trailing_metadata=tuple(metadata))
        raise AssertionError("unreachable")  # context.abort raises

    return handler


def _denied(message: str) -> GatewayError:
    return GatewayError("permission_denied", message)


def _field_error(exc: ValueError) -> GatewayError:
    """keys.py's validation error as a 400 naming the field (keys.FieldError knows which)."""
    return invalid(str(exc), exc.param if isinstance(exc, keys.FieldError) else None)


def _time(seconds: str | None) -> str:
    return iso(int(float(seconds) * 1000)) if seconds else ""


def _limits_pb(record: dict[str, str]) -> pb.Limits:
    out = pb.Limits()
    for name in keys.LIMIT_FIELDS:
        if record.get(name):
            setattr(out, name, int(record[name]))
    return out


def _requested_limits(msg: pb.Limits) -> dict[str, int]:
    return {name: getattr(msg, name) for name in keys.LIMIT_FIELDS if msg.HasField(name)}


def _expiry(raw: str) -> float | None:
    """Unix seconds from RFC 3339 / Unix time; None for ""; must be in the future."""
    if not raw:
        return None
    seconds = parse_time(raw, "expires_at") / 1000
    if seconds <= time.time():
        raise invalid("'expires_at' must be in the future.", "expires_at")
    return seconds


class ControlApi(admin_pb2_grpc.AdminServicer):
    def __init__(
        self, cfg: GatewayConfig, client: aioredis.Redis, auth: Authenticator, ledger: Ledger
    ) -> None:
        self.cfg = cfg
        self.client = client
        self.auth = auth
        self.ledger = ledger
        self.models = {m.id: m for m in cfg.models}

    async def principal(self, context: Any) -> Principal:
        md = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        peer = context.peer() or ""  # "ipv4:127.0.0.1:5555" / "ipv6:[::1]:5555"
        host = peer.partition(":")[2].rpartition(":")[0].strip("[]")
        return await self.auth.authenticate(md.get("authorization"), md.get("cookie"), lambda: host)

    # ------------------------------------------------------------------ policy
    def _account(self, p: Principal, scope: str, account: str) -> str:
        """The account a call acts on (the caller's own by default), or 403."""
        p.require(scope)
        target = account or p.account
        if target != p.account and not p.operator:
            raise _denied(f"This credential may only act on its own account ('{p.account}').")
        try:
            return keys.check_account(target)
        except ValueError as exc:
            raise invalid(str(exc), "account") from None

    @staticmethod
    def _operator(p: Principal, scope: str) -> None:
        p.require(scope)
        if not p.operator:
            raise _denied("Only the operator (the admin key or the admin account) may do this.")

    async def _key(self, p: Principal, key_id: str) -> tuple[str, dict[str, str]]:
        p.require("keys:manage")
        found = await keys.find(self.client, key_id)
        if found is None or (found[1]["account"] != p.account and not p.operator):
            raise GatewayError("not_found", _KEY_NOT_FOUND, "id")
        return found

    def _pool(self, p: Principal, models: list[str]) -> list[str] | None:
        """The pool a key gets (None: every model): models that exist and the caller may use."""
        if models == [keys.ALL_MODELS] or not models:
            pool = None if p.models is None else sorted(p.models)
        else:
            pool = models
        for m in pool or ():
            if m not in self.models:
                raise invalid(f"The model '{m}' does not exist.", "models")
            if not p.may_use(m):
                raise _denied(f"This credential may not hand out the model '{m}'.")
        return pool

    def _check_limits(self, p: Principal, wanted: dict[str, int]) -> None:
        """Tenants may only set limits no looser than their own (0 = unlimited is looser)."""
        if p.operator:
            return
        own = p.limits or self.cfg.metering.default_limits
        for name, value in wanted.items():
            ceiling = getattr(own, name)
            if ceiling and not 0 < value <= ceiling:
                raise _denied(f"'{name}' must be between 1 and this credential's own {ceiling}.")

    # ------------------------------------------------------------------ keys
    def _key_pb(self, record: dict[str, str], raw: str | None = None) -> pb.Key:
        status = record.get("status", "active")
        expires = record.get("expires_at") or ""
        if status == "active" and expires and float(expires) <= time.time():
            status = "expired"
        models = keys.decode_models(record.get("models"))
        out = pb.Key(
            object="key",
            id=record.get("id", ""),
            name=record.get("name", ""),
            account=record.get("account", ""),
            prefix=record.get("prefix", ""),
            scopes=sorted(keys.decode_scopes(record.get("scopes"))),
            models=[keys.ALL_MODELS] if models is None else sorted(models),
            status=status,
            created_at=_time(record.get("created_at")),
            expires_at=_time(expires),
            last_used_at=_time(record.get("last_used_at")),
            revoked_at=_time(record.get("revoked_at")),
            limits=_limits_pb(record),
        )
        if raw is not None:
            out.key = raw
        return out

    @_rpc
    async def CreateKey(self, request: pb.CreateKeyRequest, p: Principal) -> pb.Key:
        account = self._account(p, "keys:manage", request.account)
        scopes = list(request.scopes) or list(DEFAULT_SCOPES)
        lacking = [s for s in scopes if s not in p.scopes]
        if lacking and not p.operator:
            raise _denied(f"This credential cannot hand out the '{lacking[0]}' scope it lacks.")
        limits = _requested_limits(request.limits)
        self._check_limits(p, limits)
        try:
            raw, record = keys.new_key_record(
                request.name,
                account,
                limits,
                scopes,
                self._pool(p, list(request.models)),
                _expiry(request.expires_at),
            )
        except ValueError as exc:
            raise _field_error(exc) from None
        pipe = self.client.pipeline(transaction=True)
        keys.stage_new_key(pipe, keys.hash_key(raw), record)
        await pipe.execute()
        log.info("key_created", key_prefix=record["prefix"], account=account, by=p.key_prefix)
        return self._key_pb(record, raw)

    @_rpc
    async def ListKeys(self, request: pb.ListKeysRequest, p: Principal) -> pb.KeyList:
        account = self._account(p, "keys:manage", request.account)
        records = await keys.of_account(self.client, account)
        data = sorted((self._key_pb(r) for _, r in records), key=lambda k: k.created_at)
        return pb.KeyList(object="list", data=data)

    @_rpc
    async def GetKey(self, request: pb.GetKeyRequest, p: Principal) -> pb.Key:
        _, record = await self._key(p, request.id)
        return self._key_pb(record)

    @_rpc
    async def UpdateKey(self, request: pb.UpdateKeyRequest, p: Principal) -> pb.Key:
        key_hash, record = await self._key(p, request.id)
        fields: dict[str, str] = {}
        remove: list[str] = []
        try:
            if request.HasField("name"):
                fields["name"] = keys.check_name(request.name)
            if request.HasField("models"):
                wanted = [v.string_value for v in request.models.values]
                fields["models"] = keys.encode_models(self._pool(p, wanted))
        except ValueError as exc:
            raise _field_error(exc) from None
        if request.HasField("expires_at"):
            expiry = _expiry(request.expires_at)
            fields["expires_at"] = "" if expiry is None else f"{expiry:.3f}"
        wanted_limits = _requested_limits(request.limits)
        for name, value in wanted_limits.items():
            if value < 0:
                remove.append(name)
            else:
                fields[name] = str(value)
        self._check_limits(p, {k: v for k, v in wanted_limits.items() if v >= 0})
        if remove and not p.operator:
            raise _denied("Only the operator may remove a key's own limits.")
        if record.get("status") != "active" and fields:
            raise GatewayError("conflict", "A revoked key cannot be changed.")
        record = await keys.change(self.client, key_hash, fields, remove)
        log.info("key_updated", key_prefix=record.get("prefix"), by=p.key_prefix)
        return self._key_pb(record)

    @_rpc
    async def RevokeKey(self, request: pb.RevokeKeyRequest, p: Principal) -> pb.Key:
        key_hash, record = await self._key(p, request.id)
        if record.get("status") != "revoked":
            record = await keys.revoke(self.client, key_hash)
            log.info("key_revoked", key_prefix=record.get("prefix"), by=p.key_prefix)
        return self._key_pb(record)

    # ------------------------------------------------------------------ accounts
    async def _account_pb(self, account: str) -> pb.Account:
        record = await self.client.hgetall(store.account(account))
        n = await self.client.scard(store.account_keys(account))
        balance, pending = int(record.get("balance", 0)), int(record.get("pending", 0))
        return pb.Account(
            object="account",
            id=account,
            name=record.get("name", ""),
            created_at=_time(record.get("created_at")),
            limits=_limits_pb(record),
            balance=format_credits(balance),
            reserved=format_credits(pending),
            available=format_credits(balance - pending),
            operator=account == self.cfg.auth.admin_account,
            keys=n,
        )

    async def _known(self, account: str) -> None:
        if not await self.client.sismember(store.accounts(), account):
            raise GatewayError("not_found", f"No account '{account}'.", "id")

    def _account_fields(self, name: str | None, limits: pb.Limits) -> dict[str, str]:
        fields = {"name": name} if name is not None else {}
        for k, v in _requested_limits(limits).items():
            if v < 0:
                raise invalid(f"'{k}' must be >= 0 (0 = unlimited).", f"limits.{k}")
            fields[k] = str(v)
        if name is not None and len(name) > 200:
            raise invalid("'name' is at most 200 characters.", "name")
        return fields

    @_rpc
    async def CreateAccount(self, request: pb.CreateAccountRequest, p: Principal) -> pb.Account:
        self._operator(p, "keys:manage")
        try:
            account = keys.check_account(request.id)
        except ValueError as exc:
            raise invalid(str(exc), "id") from None
        fields = self._account_fields(request.name, request.limits)
        fields["created_at"] = f"{time.time():.3f}"
        if not await self.client.sadd(store.accounts(), account):
            raise GatewayError("conflict", f"The account '{account}' already exists.", "id")
        await self.client.hset(store.account(account), mapping=fields)
        log.info("account_created", account=account, by=p.key_prefix)
        return await self._account_pb(account)

    @_rpc
    async def ListAccounts(self, request: pb.ListAccountsRequest, p: Principal) -> pb.AccountList:
        if not p.operator:
            raise _denied("Only the operator may list accounts.")
        names = sorted(await self.client.smembers(store.accounts()))
        return pb.AccountList(object="list", data=[await self._account_pb(a) for a in names])

    @_rpc
    async def GetAccount(self, request: pb.GetAccountRequest, p: Principal) -> pb.Account:
        account = self._account(p, "usage:read", request.id)
        await self._known(account)
        return await self._account_pb(account)

    @_rpc
    async def UpdateAccount(self, request: pb.UpdateAccountRequest, p: Principal) -> pb.Account:
        self._operator(p, "keys:manage")
        account = self._account(p, "keys:manage", request.id)
        await self._known(account)
        fields = self._account_fields(
            request.name if request.HasField("name") else None, request.limits
        )
        if fields:
            await self.client.hset(store.account(account), mapping=fields)
            await announce(self.client, f"account:{account}")  # cached keys carry its limits
        return await self._account_pb(account)

    # ------------------------------------------------------------------ credits and usage
    @_rpc
    async def GetCredits(self, request: pb.GetCreditsRequest, p: Principal) -> pb.Credits:
        account = self._account(p, "usage:read", request.account)
        return pb.Credits(**await account_api.credits(self.ledger, account))

    @_rpc
    async def GrantCredits(self, request: pb.GrantCreditsRequest, p: Principal) -> pb.Grant:
        self._operator(p, "credits:manage")
        if not request.account:  # money is never granted to the caller by omission
            raise invalid("Missing required parameter: 'account'.", "account")
        account = self._account(p, "credits:manage", request.account)
        try:
            amount = parse_credits(request.amount)
        except ValueError as exc:
            raise invalid(f"'amount': {exc}", "amount") from None
        if amount <= 0:
            raise invalid("'amount' must be positive.", "amount")
        if len(request.note) > 500 or len(request.id) > 200:
            raise invalid("'note' is at most 500 characters, 'id' 200.", "note")
        balance = await self.ledger.grant(account, amount, request.note, request.id or None)
        log.info("credits_granted", account=account, amount=amount, by=p.key_prefix)
        return pb.Grant(
            object="credit_grant",
            account=account,
            granted=format_credits(amount),
            balance=format_credits(balance),
        )

    @_rpc
    async def ListTransactions(
        self, request: pb.ListTransactionsRequest, p: Principal
    ) -> pb.TransactionList:
        account = self._account(p, "usage:read", request.account)
        page = await account_api.transactions(self.ledger, account, request.limit, request.before)
        out = pb.TransactionList(object="list", has_more=page["has_more"])
        _structs(out.data, page["data"])
        json_format.ParseDict(page["next_before"], out.next_before)
        return out

    @_rpc
    async def QueryUsage(self, request: pb.QueryUsageRequest, p: Principal) -> pb.UsageList:
        account = self._account(p, "usage:read", request.account)
        page = await account_api.usage(
            self.ledger, account, request.since, request.until, request.model, request.limit
        )
        out = pb.UsageList(object="list")
        _structs(out.data, page["data"])
        return out

    @_rpc
    async def ListModels(self, request: pb.ListModelsRequest, p: Principal) -> pb.ModelList:
        p.require("models:use")
        return pb.ModelList(
            object="list",
            data=[
                pb.Model(
                    id=m.id,
                    kind=m.kind,
                    context_length=m.context_length,
                    max_tokens=m.max_tokens,
                    owned_by=m.owned_by,
                )
                for m in self.cfg.models
                if p.may_use(m.id)
            ],
        )


def _structs(field: Any, rows: list[dict[str, Any]]) -> None:
    for row in rows:
        s: struct_pb2.Struct = field.add()
        s.update(row)
