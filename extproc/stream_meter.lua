-- Tollgate: metered SSE streams, rewritten inside Envoy so the processor sees no chunk.
--
-- The processor asked the backend for usage on every chunk (vLLM: stream_options
-- include_usage + continuous_usage_stats), so a stream cut short is still charged for what it
-- generated: this filter keeps the latest usage in "tollgate.usage" (once per chunk that moved
-- it) and Envoy's gRPC access log hands it to the processor, which settles the stream
-- (ledger.py). Backends without running usage (TGI, OpenAI) report it only in their last
-- event: until then the chunks with a choice are counted as output tokens and the prompt is the
-- reservation's estimate (metadata prompt_estimate), so a cut stream is charged what passed; an
-- error event before any token marks the usage "failed" (voided), and figures of the estimate
-- and the count are marked "counted" (the ledger entry says so). The same rules as
-- stream_meter.c. Envoy's sse_to_metadata skips these streams (their route marks the response):
-- parsing every event's JSON cost Envoy ~12 µs an event; string patterns here, next to nothing.
-- Per chunk:
--   * complete events only (a partial event waits for its blank line);
--   * the per-chunk "usage" objects are read and removed (the client did not ask for them);
--   * the final usage-only event (choices: []) is removed unless the client asked for it;
--   * before "data: [DONE]" the stream's figures go out as an SSE comment, which SSE clients
--     (the OpenAI SDK too) ignore:
--       : tollgate {"object":"tollgate.credits","credits_used":"0.000111",...}
--     credits_used is the charge the ledger posts for this usage (the same integer formula as
--     money.token_cost, capped at the balance); credits_remaining is the available
--     balance at reservation time minus that charge (other requests of the account running at
--     the same moment are not reflected; GET /v1/credits is exact);
--   * at the end, the same two figures as trailers X-Credits-Used / X-Credits-Remaining, into
--     the empty trailer map the stream_trailers filter (stream_trailers.wat) made.
-- Metadata the processor sets at request time (namespace "tollgate"): stream, request_id,
-- keep_usage, price_in / price_out / price_req (micro-credits), available (before this request),
-- balance (what a charge is capped at),
-- prompt_estimate (the reservation's prompt tokens).
-- It also notes when the first chunk arrived ("tollgate.timing" first_chunk_us).
-- No httpCall here: a call yields, and a chunk cannot be held across a yield.

local ROLE_ONLY = '"delta":{"role":"assistant","content":""}'
local ROLE_ONLY_OPENAI = '"delta":{"role":"assistant","content":"","refusal":null}' -- OpenAI's

local function credits(micro)
  local sign = ""
  if micro < 0 then
    sign = "-"
    micro = -micro
  end
  local whole = math.floor(micro / 1000000)
  local frac = string.format("%06d", micro - whole * 1000000)
  frac = string.gsub(frac, "0+$", "")
  while string.len(frac) < 2 do
    frac = frac .. "0"
  end
  return string.format("%s%d.%s", sign, whole, frac)
end

-- The stream's tokens: its latest usage; from a backend that reports no running usage (TGI,
-- OpenAI) and before its usage event (the client cut the stream), the prompt estimate and one
-- output token per chunk that passed (usage.n; TGI sends one chunk per token); nil before either.
-- A stream whose backend failed (an error event) before any token or usage: zero, voided.
local function tokens(usage, md)
  if usage.p ~= nil and usage.c ~= nil then
    return usage.p, usage.c
  end
  if usage.failed then
    return 0, 0
  end
  if usage.n > 0 then
    return md["prompt_estimate"] or 0, usage.n
  end
  return nil, nil
end

-- The stream's charge, or nil while there are no tokens to charge: prompt and completion
-- tokens, used, remaining.
local function charge(usage, md)
  local p, c = tokens(usage, md)
  if p == nil then
    return nil
  end
  local cost = math.ceil((p * md["price_in"] + c * md["price_out"]) / 1000000) + md["price_req"]
  local used = usage.failed and 0 or math.min(cost, md["balance"] or md["available"])
  local left = math.max(md["available"] - used, 0)
  return { p = p, c = c, used = credits(used), remaining = credits(left) }
end

local function figures(usage, md)
  local f = charge(usage, md)
  if f == nil then
    return ': tollgate {"object":"tollgate.credits","request_id":"' .. md["request_id"]
      .. '","credits_used":null,"pending":true}\n\n'
  end
  return string.format(
    ': tollgate {"object":"tollgate.credits","request_id":"%s","prompt_tokens":%d,'
      .. '"completion_tokens":%d,"credits_used":"%s","credits_remaining":"%s"}\n\n',
    md["request_id"], f.p, f.c, f.used, f.remaining
  )
end

-- a token count: a whole number below 2^31 (no backend counts more); 1e18 or 3.7 is none
local function count_of(text, key)
  local digits, after = string.match(text, '"' .. key .. '":%s*(%d+)([^,}%s]?)')
  if digits == nil or after ~= "" or #digits > 10 then
    return nil
  end
  local v = tonumber(digits)
  return v < 2147483648 and v or nil
end

local function counts(text, usage)
  local p = count_of(text, "prompt_tokens")
  local c = count_of(text, "completion_tokens")
  if p ~= nil and c ~= nil then
    usage.p, usage.c = p, c
  end
end

-- One event, rewritten for the client; the usage it carries goes into `usage`.
-- The event without its whitespace, for the shape checks, when its JSON has spaces (Python's
-- json.dumps: "choices": [{...}]); the event itself when compact. A quote inside a JSON string
-- is escaped, so no key pattern can match inside one.
local function shape(event)
  if string.find(event, '": ', 1, true) or string.find(event, ', "', 1, true) then
    return (string.gsub(event, "%s", ""))
  end
  return event
end

local function rewrite_event(event, keep_usage, usage)
  if string.find(shape(event), '"choices":[]', 1, true) then
    -- The usage-only event (for TGI native, written by the processor's translator).
    counts(event, usage)
    if keep_usage then
      return event .. "\n\n"
    end
    return ""
  end
  -- vLLM's running usage (continuous_usage_stats), on every chunk: read, then cut out.
  local s, e, u = string.find(event, ',%s*"usage":%s*(%b{})')
  if s == nil then
    return event .. "\n\n"
  end
  counts(u, usage)
  return string.sub(event, 1, s - 1) .. string.sub(event, e + 1) .. "\n\n"
end

-- TGI native /generate_stream, translated here rather than by the processor (the recipe in
-- metadata "tgi" comes from tgi_native.py's stream_recipe: chunk templates and the error events
-- pre-rendered per error_type), chunk for chunk as tgi_native.py's _stream_body does it for the
-- streams it keeps (stop sequences, logprobs, echo). TGI writes compact JSON; token text is
-- copied as TGI escaped it.
local FINISH = { eos_token = "stop", stop_sequence = "stop", length = "length" }

-- The still-escaped content of the JSON string that starts at position i (after its quote).
local function raw_string(s, i)
  local j = i
  while true do
    local k = string.find(s, '["\\]', j)
    if k == nil then
      return nil
    end
    if string.byte(s, k) == 92 then
      j = k + 2
    else
      return string.sub(s, i, k - 1)
    end
  end
end

local function tgi_error(payload, t, md)
  local _, e = string.find(payload, '"error":%s*"')
  local msg = e and raw_string(payload, e + 1) or ""
  local parts = t.errors[string.match(payload, '"error_type":%s*"([^"]*)"') or ""] or t.errors[""]
  local out = {}
  for i = 1, #parts do
    local part = parts[i]
    if part == "\1m" then
      out[i] = msg
    elseif part == "\1r" then
      out[i] = md["request_id"]
    else
      out[i] = part
    end
  end
  return "data: " .. table.concat(out) .. "\n\n"
end

local function tgi_end(payload, t, st, usage, md, out)
  local reason = FINISH[payload and string.match(payload, '"finish_reason":%s*"([%w_]+)"') or ""]
  local p = payload and tonumber(string.match(payload, '"input_length":%s*(%d+)'))
  usage.estimated = p == nil and st.prompt_estimated
  p = p or st.prompt
  local c = payload and tonumber(string.match(payload, '"generated_tokens":%s*(%d+)')) or st.n
  reason = reason or "stop"
  if t.chat then
    out[#out + 1] = t.head .. '[{"index":0,"delta":{},"logprobs":null,"finish_reason":"'
      .. reason .. '"}]}\n\n'
  else
    out[#out + 1] = t.pre .. '"","logprobs":null,"finish_reason":"' .. reason .. '"}]}\n\n'
  end
  usage.p, usage.c = p, c
  if st.keep_usage then
    out[#out + 1] = t.head .. string.format(
      '[],"usage":{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}}\n\n', p, c, p + c
    )
  end
  out[#out + 1] = figures(usage, md)
  out[#out + 1] = "data: [DONE]\n\n"
  st.done = true
end

-- One TGI event -> the OpenAI chunks it makes, appended to out.
local function tgi_event(event, t, st, usage, md, out)
  local payload = string.match(event, "^data:%s?(.*)$")
  if payload == nil then
    return -- a keep-alive comment, or a field we do not use
  end
  if string.find(payload, '"error_type"', 1, true) or string.find(payload, '^%s*{%s*"error"') then
    usage.failed = usage.c == nil and usage.n == 0
    out[#out + 1] = tgi_error(payload, t, md)
    out[#out + 1] = figures(usage, md)
    out[#out + 1] = "data: [DONE]\n\n"
    st.done = true
    return
  end
  if payload == "[DONE]" then
    tgi_end(nil, t, st, usage, md, out)
    return
  end
  if not st.started then
    st.started = true
    if t.chat then
      out[#out + 1] = t.head .. '[{"index":0,"delta":{"role":"assistant","content":""},'
        .. '"logprobs":null,"finish_reason":null}]}\n\n'
    end
  end
  st.n = st.n + 1
  usage.n = st.n
  local _, tk = string.find(payload, '"token":%s*{')
  if tk ~= nil and string.find(payload, '"special":%s*true', tk) == nil then
    local _, e = string.find(payload, '"text":%s*"', tk)
    local text = e and raw_string(payload, e + 1)
    if text ~= nil and text ~= "" then
      out[#out + 1] = t.pre .. '"' .. text .. '"' .. t.tail
    end
  end
  if string.find(payload, '"generated_text":%s*"') then
    tgi_end(payload, t, st, usage, md, out)
  end
end

-- An event of TGI's own /generate_stream, which the per-model proxy passes as it is: one token
-- each; the last one's details hold TGI's counts (the prompt: the estimate if they lack it).
local function tgi_own_event(event, usage, md)
  usage.n = usage.n + 1
  if string.find(event, '"details":{', 1, true) then
    local c = tonumber(string.match(event, '"generated_tokens":%s*(%d+)'))
    if c ~= nil then
      local p = tonumber(string.match(event, '"input_length":%s*(%d+)'))
      usage.p, usage.c, usage.estimated = p or md["prompt_estimate"] or 0, c, p == nil
    end
  end
end

function envoy_on_response(handle)
  handle:headers():remove("x-tollgate-lua-meter")  -- the route's mark (envoy_config.py)
  handle:headers():remove("x-tollgate-trailers")  -- the processor's cue for stream_trailers
  local md = handle:streamInfo():dynamicMetadata():get("tollgate")
  if md == nil or md["stream"] ~= true then
    return
  end
  local ct = handle:headers():get("content-type")
  if ct == nil or string.find(ct, "text/event-stream", 1, true) == nil then
    return
  end
  local keep_usage = md["keep_usage"] == true
  local tgi = md["tgi"]
  local st = { started = false, done = false, n = 0, keep_usage = keep_usage }
  if tgi ~= nil then
    local header = handle:headers():get("x-prompt-tokens")
    st.prompt = header and tonumber(header) or md["prompt_estimate"] or 0
    st.prompt_estimated = header == nil
  end
  local tail = ""
  local pending_cr = false -- the last chunk ended in CR: an LF opening the next is its CRLF's
  local first = true
  local usage = { n = 0 }
  -- until the first token or usage: a stream cut in the queue or the prefill is charged its
  -- prompt (as estimated), not its reservation (nothing else writes a metered stream's usage)
  local meta0 = handle:streamInfo():dynamicMetadata()
  meta0:set("tollgate.usage", "prompt_tokens", md["prompt_estimate"] or 0)
  meta0:set("tollgate.usage", "completion_tokens", 0)
  meta0:set("tollgate.usage", "counted", 1)
  local counted_was = 1
  for chunk in handle:bodyChunks() do
    if first then
      -- The backend's first body chunk comes with its first token: time to first token
      -- (the worker's SettleLog turns it into tollgate_time_to_first_token_seconds).
      first = false
      handle:streamInfo():dynamicMetadata():set(
        "tollgate.timing", "first_chunk_us",
        handle:timestampString(EnvoyTimestampResolution.MICROSECOND)
      )
    end
    local seen_p, seen_c = tokens(usage, md)
    local bytes = chunk:getBytes(0, chunk:length())
    -- line ends made LF: SSE allows CRLF and CR too (sse-starlette writes CRLF), and events
    -- are split on a blank line; JSON carries no raw CR, so only the framing changes
    if pending_cr and string.sub(bytes, 1, 1) == "\n" then
      bytes = string.sub(bytes, 2)
    end
    pending_cr = false
    if string.find(bytes, "\r", 1, true) then
      pending_cr = string.sub(bytes, -1) == "\r"
      bytes = string.gsub(string.gsub(bytes, "\r\n", "\n"), "\r", "\n")
    end
    local data = tail .. bytes
    local out = {}
    local pos = 1
    while true do
      local s, e = string.find(data, "\n\n", pos, true)
      if s == nil then
        break
      end
      local event = string.sub(data, pos, s - 1)
      if tgi ~= nil then
        if not st.done then
          tgi_event(event, tgi, st, usage, md, out)
        end
      elseif event == "data: [DONE]" then
        out[#out + 1] = figures(usage, md)
        out[#out + 1] = "data: [DONE]\n\n"
      else
        if (usage.c == nil or usage.c == 0) and usage.n == 0
            and (string.find(event, '^data:%s*{"error"')
            or string.find(event, '^data:%s*{"object":"error"')
            or string.find(event, '^event: error')) then
          -- the backend failed before its first token ({"error"}, vLLM's older {"object":
          -- "error"}, or an error event, as the envelope dialect writes it before this meter)
          usage.failed = true
        end
        -- a chunk with a choice: a token, but for the closing one with an empty delta and an
        -- opening one with the role alone (TGI's last, with its reason, is its EOS token)
        local s = usage.c == nil and shape(event) or event
        if usage.c == nil and string.find(s, '"choices":[{', 1, true)
          and not string.find(s, '"delta":{}', 1, true)
          and not ((string.find(s, ROLE_ONLY, 1, true)
              or string.find(s, ROLE_ONLY_OPENAI, 1, true))
            and string.find(s, '"finish_reason":null', 1, true)) then
          usage.n = usage.n + 1
        elseif usage.c == nil and string.find(s, '"token":{', 1, true) then
          tgi_own_event(s, usage, md) -- TGI's own stream, untranslated (the per-model proxy)
        end
        out[#out + 1] = rewrite_event(event, keep_usage, usage)
      end
      pos = e + 1
    end
    tail = string.sub(data, pos)
    chunk:setBytes(table.concat(out))
    local p, c = tokens(usage, md)
    -- the estimate and the count, not the backend's usage: the ledger entry says so (the
    -- backend's usage may well equal them, and must still clear the mark)
    local counted = (usage.p == nil or usage.estimated) and 1 or 0
    if c ~= seen_c or p ~= seen_p or (p ~= nil and counted ~= counted_was) then
      -- what the access log hands the settling worker, also when the client cuts the stream
      local meta = handle:streamInfo():dynamicMetadata()  -- a wrapper lives for one resume
      meta:set("tollgate.usage", "prompt_tokens", p)
      meta:set("tollgate.usage", "completion_tokens", c)
      if usage.failed then
        meta:set("tollgate.usage", "failed", 1) -- the settling worker voids it
      end
      if counted ~= counted_was then
        meta:set("tollgate.usage", "counted", counted)
        counted_was = counted
      end
    end
  end
  -- The stream_trailers filter gave the response an empty trailer map: the same figures as
  -- HTTP/2 (and HTTP/3) trailers. Over HTTP/1.1 Envoy drops them; the SSE comment remains.
  local trailers = handle:trailers()
  if trailers ~= nil then
    local f = charge(usage, md)
    if f ~= nil then
      trailers:add("x-credits-used", f.used)
      trailers:add("x-credits-remaining", f.remaining)
    end
  end
end
