"""The store's Lua scripts, in one place: reserve, settle, sweep, grant, key lookup.

Each money operation is one script, so one round trip and atomic. Key names come from
extproc/store.py: the caller passes the keys it knows in KEYS, and ``reserve`` records in the
reservation the names that ``settle`` and ``sweep`` will need (``k_acct``, ``k_cc``, ...), so
the scripts never assemble a key name except by appending a minute or request id to a prefix
that store.py gave them. Keys derived that way are not in KEYS: this needs a single Valkey/Redis
instance (not Redis Cluster), which is what Tollgate runs.

Numbers: Lua numbers are doubles, exact for integers below 2^53; extproc/ledger.py keeps every
product (tokens x price per 1M) below that. Integers are written with ``int()`` (``%d``), never
with Lua's default ``%.14g`` conversion, and JSON with numbers is assembled from ``int()`` strings
for the same reason (cjson would print big integers in exponent form); cjson encodes strings
only. Scripts return integers and strings only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from .resp import FastScript, ScriptClient

DONE_TTL_S = 30 * 24 * 3600  # how long a settled request id (or grant id) stays "done"
WINDOW_TTL_S = 120  # a one-minute rate window lives until well after its minute

# Helpers shared by every script. cost() and affordable() mirror money.token_cost and
# money.max_affordable_completion, exactly (tests/test_ledger.py checks it on a grid).
#
# Cost per call matters here: Valkey shares the gateway's cores, and each ``redis.call`` costs
# ~1 µs (a write ~2 µs) on top of ~10 µs per script call. So the hot scripts read each key once
# and compute their replies from what they read; keep a reservation as one string (cjson array
# of strings) rather than a 24-field hash; touch the rate window and the in-flight set only for
# keys with such a limit; and write one ledger entry per request that the usage view reads too.
_PRELUDE = r"""
local function int(n) return string.format('%d', n) end
local function num(v) if v == nil or v == cjson.null then return 'null' end return int(v) end
local enc = cjson.encode

-- money.token_cost: ceil((p * in + c * out) / 1e6) + per_request. Exact while the sum is below
-- 2^53: a double quotient x / d is off by at most x / d * 2^-53 < 1 / d, less than the distance
-- from a non-integer x / d to any integer, so math.ceil and math.floor see the true quotient.
local function cost(pin, pout, preq, p, c)
  return math.ceil((p * pin + c * pout) / 1000000) + preq
end

-- min(cap, money.max_affordable_completion(...)), or -1 when not even c = 0 is affordable
local function affordable(pin, pout, preq, p, cap, available)
  if cost(pin, pout, preq, p, 0) > available then return -1 end
  if cost(pin, pout, preq, p, cap) <= available then return cap end
  -- cost(cap) > available, so this budget is below cap * pout < 2^53 (and pout > 0): exact
  local budget = (available - preq) * 1000000 - p * pin
  return math.floor(budget / pout)
end

local function balances(acct_key)
  local v = redis.call('HMGET', acct_key, 'balance', 'pending')
  return tonumber(v[1]) or 0, tonumber(v[2]) or 0
end

-- what is left of a limit; -1 means the limit is 0 (unlimited)
local function left(limit, used)
  if limit <= 0 then return -1 end
  return math.max(limit - used, 0)
end

-- a key's rate window, read only when it has a rate limit (nothing counts for unlimited keys)
local function window(key, rpm, tpm)
  if rpm <= 0 and tpm <= 0 then return 0, 0 end
  local v = redis.call('HMGET', key, 'req', 'tok')
  return tonumber(v[1]) or 0, tonumber(v[2]) or 0
end
"""

# The reservation record, a JSON array of strings in this order (RESERVE writes it).
RESV_FIELDS = (
    "account", "key_prefix", "model", "backend", "amount", "prompt_est", "granted",
    "tok_reserved", "unit", "minute", "input_per_1m", "output_per_1m", "per_request", "rpm", "tpm",
    "created_ms", "expires_ms", "k_acct", "k_cc", "k_rl_prefix", "k_ledger", "k_done", "attempt",
)  # fmt: skip

# What settle and sweep add to the prelude: reading a reservation, and posting it.
_POSTING = (
    _PRELUDE
    + r"""
-- The record at `key` from its string `raw` (MGET's answer: nil for a missing key and for a
-- hash, the form an earlier version wrote, with the same names): the reservation, or nil when
-- there is none; and second, a settled request's figures, which post() leaves at the
-- reservation's key (a JSON array shorter than a reservation's).
local function reservation(key, raw)
  if not raw then
    if redis.call('TYPE', key).ok ~= 'hash' then return nil end
    local flat, r = redis.call('HGETALL', key), {}
    for i = 1, #flat, 2 do r[flat[i]] = flat[i + 1] end
    r.unit = r.unit or 'tokens'
    return r
  end
  local l = cjson.decode(raw)
  -- a reservation (an earlier version's has no attempt: one field fewer), else the figures
  if #l ~= RESV_LEN and #l ~= RESV_LEN - 1 then return nil, l end
  return {"""
    + ", ".join(f"{name} = l[{i}]" for i, name in enumerate(RESV_FIELDS, 1))
    + r"""}
end

-- Post a reservation: release it, charge `amount_due` capped at the balance (the rest is
-- written off, so the balance never goes negative; credits other reservations of the account
-- hold are no cap: an overrun is paid while the balance can pay it, and a reservation whose
-- credits it took is capped in turn, so the account pays all it can and the operator writes
-- off the least), write the ledger entry (which is also the
-- request's usage record), and replace the reservation with the settled figures, which mark
-- the request id as used for DONE_TTL (one write; a separate done marker took two). `tok_used`
-- (or nil: keep the reserved count) replaces the reserved tokens in the reservation's rate
-- window.
-- Returns charge, balance, pending, written_off, and that window's req and tok when it was read.
local function post(rid, resv_key, r, due_key, amount_due, kind, reason, tin, tout, tok_used,
                    http_status, latency_ms, now, counted)
  local reserved = tonumber(r.amount)
  local balance, pending = balances(r.k_acct)
  pending = pending - reserved
  local charge = math.min(amount_due, math.max(balance, 0))
  local written_off = amount_due - charge
  balance = balance - charge
  redis.call('HSET', r.k_acct, 'balance', int(balance), 'pending', int(pending))
  local rpm, tpm = tonumber(r.rpm), tonumber(r.tpm)
  local tok_reserved = tonumber(r.tok_reserved)
  local req, tok
  if tok_used and (rpm > 0 or tpm > 0) then
    local rl_key = r.k_rl_prefix .. r.minute
    local v = redis.call('HMGET', rl_key, 'req', 'tok')
    if v[1] then  -- the window still exists (never recreate one without its expiry)
      req, tok = tonumber(v[1]), tonumber(v[2]) or 0
      if tok_used ~= tok_reserved then
        tok = redis.call('HINCRBY', rl_key, 'tok', int(tok_used - tok_reserved))
      end
    end
  end
  if r.k_cc ~= '' then redis.call('ZREM', r.k_cc, rid) end
  redis.call('ZREM', due_key, rid)
  local erid = enc(rid)
  redis.call('ZADD', r.k_ledger, int(now), table.concat({
    '{"id":', erid, ',"ts":', int(now), ',"type":"', kind, '","amount":', int(-charge),
    ',"balance":', int(balance), ',"request_id":', erid, ',"model":', enc(r.model),
    ',"key_prefix":', enc(r.key_prefix), ',"tokens_in":', num(tin), ',"tokens_out":', num(tout),
    ',"unit":', enc(r.unit), ',"reserved":', int(reserved), ',"written_off":', int(written_off),
    ',"reason":', enc(reason), ',"backend":', enc(r.backend), ',"latency_ms":', num(latency_ms),
    ',"status":', num(http_status), counted and ',"counted":true}' or '}'}))
  redis.call('SET', resv_key, enc({int(charge), int(written_off), kind, r.k_acct, r.k_rl_prefix,
    r.rpm, r.tpm}), 'EX', DONE_TTL)
  return charge, balance, pending, written_off, req, tok
end
"""
)

# 1. reserve: rate check + concurrency check + credit reservation, in this order.
# KEYS: resv, done, rate window (this minute), in-flight zset, due zset, account, accounts,
#       ledger (only recorded in the reservation, for settle)
# ARGV: request_id, account, key_hash, key_prefix, model, backend, prompt_tokens,
#       requested_max_tokens (0 = clamp to what the balance and the limits allow, up to cap;
#       with cap 0 too, the request generates nothing: embeddings), cap,
#       input_per_1m, output_per_1m, per_request, rpm, tpm, concurrency (0 = unlimited),
#       now_ms, ttl_ms, minute, rate window prefix, unit, sequences, attempt
#       unit: what prompt_tokens count ('tokens'; for media 'audio_seconds', 'characters' or
#       'images', priced through input_per_1m and never counted in the tokens-per-minute window)
#       sequences: how many sequences the backend generates, each up to max_tokens (n choices,
#       per prompt of a batch): the worst case is sequences x max_tokens; a clamp grants each
#       the same share of what the money and the window allow. The reply's granted is per
#       sequence (the max_tokens to send); the reservation records the total.
#       attempt: this reserve call's own id, kept in the reservation: a void that may follow a
#       reserve whose answer never came (the client left, the store's answer was lost) names
#       it, so it can only void what this call reserved, never the request id's owner's.
# Returns {status, granted, amount, rpm_limit, rpm_remaining, tpm_limit, tpm_remaining,
#          reset_s, retry_after, balance, pending, available} for every status; status is one
#          of ok, duplicate, rate_limit_requests, concurrency, rate_limit_tokens,
#          insufficient_credits. Remaining is -1 for an unlimited (0) limit.
# A key without rpm and tpm limits keeps no rate window, and one without a concurrency limit
# is not in the in-flight set: a limit set later counts from the first request after it.
RESERVE = (
    _PRELUDE
    + r"""
local resv_key, done_key, rl_key, cc_key, due_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local acct_key, accounts_key, ledger_key = KEYS[6], KEYS[7], KEYS[8]
local rid = ARGV[1]
local prompt, requested, cap = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local pin, pout, preq = tonumber(ARGV[10]), tonumber(ARGV[11]), tonumber(ARGV[12])
local rpm, tpm, conc = tonumber(ARGV[13]), tonumber(ARGV[14]), tonumber(ARGV[15])
local now, ttl, minute = tonumber(ARGV[16]), tonumber(ARGV[17]), tonumber(ARGV[18])
local unit = ARGV[20] or 'tokens'
local seqs = math.max(tonumber(ARGV[21]) or 1, 1)
local windowed = unit == 'tokens'  -- media units are not tokens: the tpm window ignores them

local reset_s = math.max(math.ceil(((minute + 1) * 60000 - now) / 1000), 1)
local req, tok = window(rl_key, rpm, tpm)
local acct = redis.call('HMGET', acct_key, 'balance', 'pending')
local balance, pending = tonumber(acct[1]) or 0, tonumber(acct[2]) or 0

local function reply(status, granted, amount, retry_after)
  return {status, granted, amount, rpm, left(rpm, req), tpm, left(tpm, tok), reset_s,
          retry_after, balance, pending, balance - pending}
end

-- (a) a request id is reserved and settled once
if redis.call('EXISTS', resv_key, done_key) > 0 then return reply('duplicate', 0, 0, 0) end

-- (b) requests per fixed minute window
if rpm > 0 and req + 1 > rpm then return reply('rate_limit_requests', 0, 0, reset_s) end

-- (c) concurrency: members whose reservation timed out no longer count
if conc > 0 and redis.call('ZCARD', cc_key) >= conc then
  redis.call('ZREMRANGEBYSCORE', cc_key, '-inf', int(now))
  if redis.call('ZCARD', cc_key) >= conc then return reply('concurrency', 0, 0, 1) end
end

-- (d) money, and the token window
local available = balance - pending
local granted = requested  -- cap 0 and no max_tokens: nothing to generate (embeddings)
if requested <= 0 and cap > 0 then
  granted = math.floor(affordable(pin, pout, preq, prompt, cap * seqs, available) / seqs)
  if granted < 1 then return reply('insufficient_credits', 0, 0, 0) end
  if tpm > 0 then granted = math.min(granted, math.floor((tpm - tok - prompt) / seqs)) end
  if granted < 1 then return reply('rate_limit_tokens', 0, 0, reset_s) end
end
local out = granted * seqs  -- every sequence may run to max_tokens
local amount = cost(pin, pout, preq, prompt, out)
local counted = windowed and prompt + out or 0
if tpm > 0 and tok + counted > tpm then
  return reply('rate_limit_tokens', 0, amount, reset_s)
end
if amount > available then return reply('insufficient_credits', 0, amount, 0) end

-- (e) apply
if rpm > 0 or tpm > 0 then
  req, tok = req + 1, tok + counted
  redis.call('HSET', rl_key, 'req', int(req), 'tok', int(tok))
  if req == 1 then redis.call('EXPIRE', rl_key, WINDOW_TTL) end  -- a new window
end
if conc > 0 then redis.call('ZADD', cc_key, int(now + ttl), rid) else cc_key = '' end
redis.call('SET', resv_key, enc({
  ARGV[2], ARGV[4], ARGV[5], ARGV[6], int(amount), int(prompt), int(out), int(counted), unit,
  int(minute), int(pin), int(pout), int(preq), int(rpm), int(tpm), int(now), int(now + ttl),
  acct_key, cc_key, ARGV[19], ledger_key, done_key, ARGV[22] or ''}))
redis.call('ZADD', due_key, int(now + ttl), rid)
pending = redis.call('HINCRBY', acct_key, 'pending', int(amount))
-- an account with a balance is listed already (a grant lists it): list only the others
if not acct[1] then redis.call('SADD', accounts_key, ARGV[2]) end
return reply('ok', granted, amount, 0)
"""
)

# 2. settle: post the real amount, or void, exactly once.
# settle_one's arguments: the reservation's key, its done key (an earlier version's marker), the
# due zset; request_id, prompt_tokens, completion_tokens (-1 = unknown; -2 = served, usage
# unknown: charge the reservation), http status, latency_ms (< 0: from the reservation's
# creation), now_ms, reason, counted (true: the tokens are the stream meter's count, the prompt
# its estimate; the debit's ledger entry says "counted": true).
# Void (charge 0) when the usage is unknown, or when the backend failed (status >= 400; the
# client got an error, whatever usage its body named). Otherwise charge the price on the real
# tokens: below the reserved amount usually, above it if the backend overran max_tokens or the
# prompt its estimate (capped at the balance).
# Returns {status, charged, balance, pending, available, rpm_remaining, tpm_remaining,
#          written_off, entry type}; status ok | duplicate (the first settlement's figures,
#          nothing charged now) | unknown (no such reservation).
_SETTLE_ONE = (
    _POSTING
    + r"""
local function settle_one(resv_key, done_key, due_key, rid, p, c, http_status, latency_ms, now,
                          reason, counted, attempt)
  local this_minute = math.floor(now / 60000)
  -- window_minute, req, tok: the window post() read, reused when it is this minute's
  local function reply(status, charged, written_off, kind, rl_prefix, rpm, tpm, balance, pending,
                       window_minute, req, tok)
    if not (req and window_minute == this_minute) then
      req, tok = window(rl_prefix .. int(this_minute), rpm, tpm)
    end
    return {status, charged, balance, pending, balance - pending, left(rpm, req), left(tpm, tok),
            written_off, kind}
  end

  local got = redis.call('MGET', done_key, resv_key)
  local r, d
  if got[1] then  -- the done marker of an earlier version
    d = cjson.decode(got[1])
  else
    r, d = reservation(resv_key, got[2])
  end
  if d then
    if d[1] == nil then  -- written by an earlier version, as an object
      d = {d.charged, d.written_off, d.type, d.k_acct, d.k_rl_prefix, d.rpm, d.tpm}
    end
    local balance, pending = balances(d[4])
    return reply('duplicate', tonumber(d[1]), tonumber(d[2]), d[3], d[5], tonumber(d[6]),
                 tonumber(d[7]), balance, pending)
  end
  if not r then return {'unknown', 0, 0, 0, 0, -1, -1, 0, ''} end
  if attempt ~= '' and (r.attempt or '') ~= attempt then
    -- a void for a reserve call whose answer never came, and another call reserved this id
    -- (a duplicate X-Request-ID that was refused): not this caller's to void
    return {'unknown', 0, 0, 0, 0, -1, -1, 0, ''}
  end
  if latency_ms < 0 then latency_ms = now - tonumber(r.created_ms) end
  local known = p >= 0 and c >= 0
  local kind, amount_due, tin, tout = 'debit', 0, cjson.null, cjson.null
  local used = 0
  if p == -2 then
    -- served, but the usage is unknown: charge the reservation (the worst case it covered);
    -- its tokens are the estimate and the grant, which the reason says
    amount_due, tin, tout = tonumber(r.amount), tonumber(r.prompt_est), tonumber(r.granted)
    used = tonumber(r.tok_reserved)
    if reason == 'settled' then reason = 'usage_unknown' end
  else
    if known then tin, tout, used = p, c, p + c end
    if r.unit ~= 'tokens' then used = 0 end
    if not known or http_status >= 400 then  -- a backend error is voided, usage or not
      kind = 'void'
    else
      amount_due = cost(tonumber(r.input_per_1m), tonumber(r.output_per_1m),
                        tonumber(r.per_request), p, c)
    end
  end
  local charge, balance, pending, written_off, req, tok = post(
    rid, resv_key, r, due_key, amount_due, kind, reason, tin, tout, used, http_status,
    latency_ms, now, counted and kind == 'debit')
  return reply('ok', charge, written_off, kind, r.k_rl_prefix, tonumber(r.rpm), tonumber(r.tpm),
               balance, pending, tonumber(r.minute), req, tok)
end
"""
)

# 2a. settle one request.
# KEYS: resv, done, due zset
# ARGV: request_id, prompt_tokens, completion_tokens, http status, latency_ms, now_ms, reason,
#       counted ('1' or '0'), attempt ('' or absent: any; else only the reservation that reserve
#       call made); as settle_one. Returns settle_one's reply.
SETTLE = (
    _SETTLE_ONE
    + r"""
return settle_one(KEYS[1], KEYS[2], KEYS[3], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]),
                  tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7],
                  ARGV[8] == '1', ARGV[9] or '')
"""
)

# 2b. settle many requests in one call (a batch of the settling access log): one round trip
# and one script call instead of one per request, each request settled exactly as by SETTLE.
# A request whose settlement fails (a Lua error) does not stop the others: its reply is
# {'error', message}. What it wrote before the error stays, as with SETTLE (Valkey rolls no
# script back); the realistic errors (a corrupt record) come before any write.
# KEYS: due zset.  ARGV: reservation key prefix, done key prefix, then SETTLE's 8 arguments
# for each request in turn.  Returns one settle_one reply per request, in order.
# The store runs nothing else meanwhile: ~20 µs a request, and a 16 KB access-log message
# (envoy_config._settle_logs) carries ~19 of them, so a reserve queued behind waits <0.5 ms.
SETTLE_MANY = (
    _SETTLE_ONE
    + r"""
local due_key, resv_prefix, done_prefix = KEYS[1], ARGV[1], ARGV[2]
local out = {}
for i = 3, #ARGV, 8 do
  local rid = ARGV[i]
  local ok, res = pcall(settle_one, resv_prefix .. rid, done_prefix .. rid, due_key, rid,
                        tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3]),
                        tonumber(ARGV[i + 4]), tonumber(ARGV[i + 5]), ARGV[i + 6],
                        ARGV[i + 7] == '1', '')
  if ok then
    out[#out + 1] = res
  else
    out[#out + 1] = {'error', tostring(res)}
  end
end
return out
"""
)

# 3. sweep: resolve reservations whose timeout passed without a settlement, by charging the
# reserved amount (capped at the balance, like settle). The reserved tokens stay counted.
# KEYS: due zset.  ARGV: now_ms, limit, reservation key prefix.  Returns how many expired.
SWEEP = (
    _POSTING
    + r"""
local due_key = KEYS[1]
local now, limit, resv_prefix = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local reason = 'no settlement within the reservation timeout; charged the reserved amount'
local ids = redis.call('ZRANGEBYSCORE', due_key, '-inf', int(now), 'LIMIT', 0, int(limit))
local expired = 0
for _, rid in ipairs(ids) do
  local resv_key = resv_prefix .. rid
  local r = reservation(resv_key, redis.call('MGET', resv_key)[1])
  if r then
    post(rid, resv_key, r, due_key, tonumber(r.amount), 'expired', reason,
         tonumber(r.prompt_est), tonumber(r.granted), nil, 0, now - tonumber(r.created_ms), now)
    expired = expired + 1
  else
    redis.call('ZREM', due_key, rid)
  end
end
return expired
"""
)

# 4. grant: add credits, once per grant id when one is given.
# KEYS: account, accounts, ledger, grant marker (only checked when ARGV[5] == '1')
# ARGV: account, amount, note, entry id, idempotent (1/0), now_ms
# Returns {status (ok | duplicate), balance}.
GRANT = (
    _PRELUDE
    + r"""
-- JSON object from a flat list {k1, v1, k2, v2, ...}; numbers as integers, cjson.null as null
local function json(fields)
  local parts = {}
  for i = 1, #fields, 2 do
    local v = fields[i + 1]
    if type(v) == 'number' then v = int(v) else v = enc(v) end
    parts[#parts + 1] = enc(fields[i]) .. ':' .. v
  end
  return '{' .. table.concat(parts, ',') .. '}'
end

local acct_key, accounts_key, ledger_key, marker_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local amount, now = tonumber(ARGV[2]), tonumber(ARGV[6])
local idempotent = ARGV[5] == '1'
if idempotent and redis.call('EXISTS', marker_key) == 1 then
  local balance = balances(acct_key)
  return {'duplicate', balance}
end
local balance = redis.call('HINCRBY', acct_key, 'balance', int(amount))
redis.call('SADD', accounts_key, ARGV[1])
redis.call('ZADD', ledger_key, int(now), json({
  'id', ARGV[4], 'ts', now, 'type', 'grant', 'amount', amount, 'balance', balance,
  'note', ARGV[3]}))
if idempotent then redis.call('SET', marker_key, int(now), 'EX', DONE_TTL) end
return {'ok', balance}
"""
)


# 4b. fold: the ledger's retention. Entries older than the cutoff become one ``checkpoint``
# entry whose amount is their sum, so the ledger still adds up to the balance (reconcile) and
# its oldest entry says what was folded. A checkpoint older than the cutoff is folded into the
# next one with the rest. Oldest first, at most ``limit`` entries per call (each is decoded).
# Its balance is that sum too: a ledger starts at 0 and holds every change (reconcile), so the
# sum of its oldest entries is the balance right after them. (Not the last entry's balance:
# entries of one millisecond are ordered by their JSON text, not by when they were made.)
# KEYS: ledger.  ARGV: cutoff_ms, limit.  Returns {members read (up to limit), entries newly
# folded (not counting an earlier checkpoint)}: {0, 0} when only a checkpoint is that old.
FOLD = (
    _PRELUDE
    + r"""
local ledger_key, cutoff, limit = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2])
local old = redis.call('ZRANGEBYSCORE', ledger_key, '-inf', '(' .. int(cutoff), 'LIMIT', 0,
                       int(limit))
if #old == 0 then return {0, 0} end
local total, n, fresh, first_ts, last_ts = 0, 0, 0, math.huge, 0
for _, member in ipairs(old) do
  local e = cjson.decode(member)
  if e.type == 'checkpoint' then
    if #old == 1 then return {0, 0} end
    n = n + e.entries
  else
    n, fresh = n + 1, fresh + 1
  end
  total = total + e.amount
  first_ts = math.min(first_ts, tonumber(e.since) or e.ts)
  last_ts = e.ts
end
redis.call('ZREMRANGEBYRANK', ledger_key, 0, #old - 1)
redis.call('ZADD', ledger_key, int(last_ts), table.concat({
  '{"id":"checkpoint-', int(last_ts), '-', int(n), '","ts":', int(last_ts),
  ',"type":"checkpoint","amount":', int(total), ',"balance":', int(total),
  ',"entries":', int(n), ',"since":', int(first_ts), '}'}))
return {#old, fresh}
"""
)

# 5. key lookup (auth.py, on a worker's cache miss): the failed-lookup limit and the key's record
# with its account's limits, in one round trip.
# KEYS: key record, failure counter of the client address
# ARGV: failure limit (0 = none), account hash prefix, failure window (s)
# Returns {'blocked', seconds left} | {'unknown'} | {'ok', record (flat), account rpm, tpm, conc}
KEY_LOOKUP = r"""
local limit = tonumber(ARGV[1])
if limit > 0 then
  local fails = tonumber(redis.call('GET', KEYS[2]) or '0')
  if fails >= limit then
    return {'blocked', math.max(redis.call('TTL', KEYS[2]), 1)}
  end
end
local rec = redis.call('HGETALL', KEYS[1])
if #rec == 0 then
  if limit > 0 and redis.call('INCR', KEYS[2]) == 1 then
    redis.call('EXPIRE', KEYS[2], tonumber(ARGV[3]))
  end
  return {'unknown'}
end
local account = ''
for i = 1, #rec, 2 do if rec[i] == 'account' then account = rec[i + 1] end end
local a = redis.call('HMGET', ARGV[2] .. account, 'rpm', 'tpm', 'concurrency')
return {'ok', rec, a[1] or '', a[2] or '', a[3] or ''}
"""


def _with_constants(source: str) -> str:
    return (
        f"local DONE_TTL = {DONE_TTL_S}\nlocal WINDOW_TTL = {WINDOW_TTL_S}\n"
        f"local RESV_LEN = {len(RESV_FIELDS)}\n{source}"
    )


@dataclass(frozen=True, slots=True)
class Scripts:
    reserve: Any  # redis-py AsyncScript or resp.FastScript: await s(keys=[...], args=[...])
    settle: Any
    settle_many: Any
    sweep: Any
    grant: Any
    fold: Any


def register(client: aioredis.Redis, fast: ScriptClient | None = None) -> Scripts:
    """Register the scripts on a client: calls use EVALSHA and load the script on NOSCRIPT.

    With ``fast``, the hot path's scripts (reserve, settle, settle_many) go through the pipelined
    client."""
    reserve, settle = _with_constants(RESERVE), _with_constants(SETTLE)
    many = _with_constants(SETTLE_MANY)
    return Scripts(
        reserve=FastScript(fast, reserve) if fast else client.register_script(reserve),
        settle=FastScript(fast, settle) if fast else client.register_script(settle),
        settle_many=FastScript(fast, many) if fast else client.register_script(many),
        sweep=client.register_script(_with_constants(SWEEP)),
        grant=client.register_script(_with_constants(GRANT)),
        fold=client.register_script(_with_constants(FOLD)),
    )
