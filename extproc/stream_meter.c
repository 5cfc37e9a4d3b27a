/*
 * Tollgate: the metered-stream meter as an Envoy dynamic module (C, no dependencies).
 *
 * The same job as stream_meter.lua does for OpenAI-style streams (vLLM, TGI's messages API,
 * OpenAI), at a fraction of its cost: measured, the Lua meter was ~10% of the gateway's
 * throughput on short streams (README, "Speed"). TGI's native /generate_stream streams stay with
 * the Lua meter (their translation lives there); envoy_config.py enables this filter only where
 * the Lua meter is disabled, and Lua stays the fallback where no C compiler exists
 * (native_meter.py builds this file).
 *
 * What it does, chunk for chunk, exactly as the Lua meter's OpenAI path (a parity test runs
 * both on the same streams):
 *   - complete SSE events only; a partial event waits for its blank line;
 *   - the per-chunk "usage" objects (vLLM continuous_usage_stats) are read and cut out;
 *   - the usage-only event ("choices":[]) is read and dropped unless the client asked for it
 *     (metadata tollgate.keep_usage);
 *   - before "data: [DONE]", the SSE comment with the stream's figures;
 *   - the latest usage into dynamic metadata tollgate.usage (once, when the stream is over),
 *     which the gRPC access log hands to the settling worker; from a backend that reports no
 *     running usage (TGI, OpenAI) and a stream that ended without its usage event, the prompt
 *     estimate (metadata prompt_estimate) and the chunks counted; a stream whose backend failed
 *     (an error event) before any token or usage: zero tokens and "failed", which voids it;
 *     figures of the estimate and the count are marked "counted" (the ledger entry says so);
 *   - the first chunk's time into tollgate.timing first_chunk_us (TTFT);
 *   - on the trailers the stream_trailers filter made: X-Credits-Used, X-Credits-Remaining.
 * Active only on responses carrying the stream route's mark header (envoy_config.py), which it
 * removes.
 *
 * The declarations below are this module's own view of Envoy's dynamic-module C ABI (only the
 * calls it makes); their shapes follow Envoy's abi.h.
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct {
  const char *ptr;
  size_t length;
} tg_buf; /* envoy_dynamic_module_type_{envoy,module}_buffer */

enum { HDR_RESPONSE = 2, HDR_RESPONSE_TRAILER = 3 };
enum { BODY_RECEIVED_RESPONSE = 2 };
enum { MD_DYNAMIC = 0 };

extern bool envoy_dynamic_module_callback_http_get_header(void *f, int type, tg_buf key,
                                                          tg_buf *out, size_t index,
                                                          size_t *count);
extern bool envoy_dynamic_module_callback_http_set_header(void *f, int type, tg_buf key,
                                                          tg_buf value);
extern bool envoy_dynamic_module_callback_http_add_header(void *f, int type, tg_buf key,
                                                          tg_buf value);
extern size_t envoy_dynamic_module_callback_http_get_body_chunks_size(void *f, int type);
extern bool envoy_dynamic_module_callback_http_get_body_chunks(void *f, int type, tg_buf *out);
extern bool envoy_dynamic_module_callback_http_drain_body(void *f, int type, size_t n);
extern bool envoy_dynamic_module_callback_http_append_body(void *f, int type, tg_buf data);
extern bool envoy_dynamic_module_callback_http_get_metadata_number(void *f, int src, tg_buf ns,
                                                                   tg_buf key, double *out);
extern bool envoy_dynamic_module_callback_http_get_metadata_string(void *f, int src, tg_buf ns,
                                                                   tg_buf key, tg_buf *out);
extern bool envoy_dynamic_module_callback_http_get_metadata_bool(void *f, int src, tg_buf ns,
                                                                 tg_buf key, bool *out);
extern void envoy_dynamic_module_callback_http_set_dynamic_metadata_number(void *f, tg_buf ns,
                                                                           tg_buf key,
                                                                           double value);
extern void envoy_dynamic_module_callback_http_set_dynamic_metadata_string(void *f, tg_buf ns,
                                                                           tg_buf key,
                                                                           tg_buf value);

#define LIT(s) ((tg_buf){(s), sizeof(s) - 1})

/* ---- growable byte buffer ---- */

typedef struct {
  char *p;
  size_t n, cap;
} bytes;

static bool reserve(bytes *b, size_t more) {
  if (b->n + more <= b->cap) return true;
  size_t cap = b->cap ? b->cap : 256;
  while (cap < b->n + more) cap *= 2;
  char *p = realloc(b->p, cap);
  if (p == NULL) return false;
  b->p = p;
  b->cap = cap;
  return true;
}

static void put(bytes *b, const char *s, size_t n) {
  if (n && reserve(b, n)) {
    memcpy(b->p + b->n, s, n);
    b->n += n;
  }
}

/* ---- one metered stream ---- */


typedef struct {
  bool active, seen_body, keep_usage, have_usage;
  bool failed; /* an error event before any token or usage: the stream is voided */
  bool pending_cr; /* the last chunk ended in CR: an LF opening the next one is its CRLF's */
  bool estimated; /* the figures are the prompt estimate and the counted chunks, not usage */
  long long price_in, price_out, price_req, available, balance;
  long long prompt, completion;
  long long prompt_estimate, counted; /* for backends that report no running usage */
  char *request_id;
  size_t request_id_len;
  bytes tail; /* a partial event, waiting for its blank line */
} meter;

/* Append a body chunk to the meter's tail with its line ends made LF: SSE allows CRLF and CR
 * as well (sse-starlette writes CRLF), and the events are split on a blank line ("\n\n"); a
 * CRLF split between two chunks is one line end. JSON carries no raw CR, so only the framing
 * changes. */
static void put_lf(meter *m, const char *s, size_t n) {
  if (n > 0 && m->pending_cr && s[0] == '\n') s++, n--;
  m->pending_cr = false;
  if (n == 0) return;
  if (memchr(s, '\r', n) == NULL) {
    put(&m->tail, s, n);
    return;
  }
  for (size_t i = 0; i < n; i++) {
    if (s[i] != '\r') {
      put(&m->tail, s + i, 1);
      continue;
    }
    put(&m->tail, "\n", 1);
    if (i + 1 < n && s[i + 1] == '\n') i++;
    else if (i + 1 == n) m->pending_cr = true;
  }
}

static bool md_number(void *f, tg_buf key, long long *out) {
  double v;
  if (!envoy_dynamic_module_callback_http_get_metadata_number(f, MD_DYNAMIC, LIT("tollgate"), key,
                                                              &v))
    return false;
  *out = (long long)v;
  return true;
}

/* Micro-credits as the API writes credits: "1234.50" (at least two decimals, no trailing 0s). */
static int credits(char *out, size_t cap, long long micro) {
  const char *sign = "";
  if (micro < 0) {
    sign = "-";
    micro = -micro;
  }
  char frac[8];
  snprintf(frac, sizeof frac, "%06lld", micro % 1000000);
  int len = 6;
  while (len > 2 && frac[len - 1] == '0') len--;
  frac[len] = '\0';
  return snprintf(out, cap, "%s%lld.%s", sign, micro / 1000000, frac);
}

/* A backend without running usage (TGI, OpenAI) reports tokens only in its last event: a stream
 * that ends without it (the client cut it) is charged the gateway's prompt estimate and one
 * output token per chunk that passed (TGI sends one chunk per token). */
static void counted_usage(meter *m) {
  if (m->have_usage || (m->counted == 0 && !m->failed)) return;
  m->prompt = m->failed ? 0 : m->prompt_estimate;
  m->estimated = !m->failed;
  m->completion = m->counted;
  m->have_usage = true;
}

/* The stream's charge (as money.token_cost, capped at the balance, as the settle script caps
 * it), and what is left available (not below 0: an overrun may take credits others hold). */
static void charge(const meter *m, char *used, char *remaining, size_t cap) {
  long long cost = (m->prompt * m->price_in + m->completion * m->price_out + 999999) / 1000000 +
                   m->price_req;
  long long u = m->failed ? 0 : cost < m->balance ? cost : m->balance;
  credits(used, cap, u);
  credits(remaining, cap, m->available > u ? m->available - u : 0);
}

static void figures(meter *m, bytes *out) {
  char line[512];
  int n;
  counted_usage(m);
  if (!m->have_usage) {
    n = snprintf(line, sizeof line,
                 ": tollgate {\"object\":\"tollgate.credits\",\"request_id\":\"%.*s\","
                 "\"credits_used\":null,\"pending\":true}\n\n",
                 (int)m->request_id_len, m->request_id ? m->request_id : "");
  } else {
    char used[40], remaining[40];
    charge(m, used, remaining, sizeof used);
    n = snprintf(line, sizeof line,
                 ": tollgate {\"object\":\"tollgate.credits\",\"request_id\":\"%.*s\","
                 "\"prompt_tokens\":%lld,\"completion_tokens\":%lld,\"credits_used\":\"%s\","
                 "\"credits_remaining\":\"%s\"}\n\n",
                 (int)m->request_id_len, m->request_id ? m->request_id : "", m->prompt,
                 m->completion, used, remaining);
  }
  if (n > 0) put(out, line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1);
}

/* ---- SSE text, as the Lua patterns read it ---- */

static bool is_space(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

static const char *find(const char *s, size_t n, const char *needle, size_t k) {
  if (k == 0 || n < k) return NULL;
  const char *end = s + n - k;
  for (const char *p = s; p <= end; p++) {
    p = memchr(p, needle[0], (size_t)(end - p) + 1);
    if (p == NULL) return NULL;
    if (memcmp(p, needle, k) == 0) return p;
  }
  return NULL;
}

/* The first `"key":<spaces><digits>` in s[0..n) (Lua: '"key":%s*(%d+)'). */
static bool number_after(const char *s, size_t n, const char *key, size_t k, long long *out) {
  const char *end = s + n;
  for (const char *p = find(s, n, key, k); p != NULL;
       p = find(p + 1, (size_t)(end - p - 1), key, k)) {
    const char *q = p + k;
    while (q < end && is_space(*q)) q++;
    if (q < end && *q >= '0' && *q <= '9') {
      /* a token count: a whole number below 2^31 (no backend counts more); 1e18, 3.7 or a
       * run of digits no long long holds is no count, and the stream counts its chunks */
      long long v = 0;
      int digits = 0;
      while (q < end && *q >= '0' && *q <= '9' && digits < 11) v = v * 10 + (*q++ - '0'), digits++;
      if (v >= 2147483648LL || (q < end && ((*q >= '0' && *q <= '9') || *q == '.' || *q == 'e' ||
                                            *q == 'E')))
        return false;
      *out = v;
      return true;
    }
  }
  return false;
}

static void counts(meter *m, const char *s, size_t n) {
  long long p, c;
  if (number_after(s, n, "\"prompt_tokens\":", 16, &p) &&
      number_after(s, n, "\"completion_tokens\":", 20, &c)) {
    m->prompt = p;
    m->completion = c;
    m->have_usage = true;
  }
}

/* The first `,<spaces>"usage":<spaces>{...}` (balanced braces) in s: its start and end. */
static bool usage_object(const char *s, size_t n, size_t *from, size_t *to, size_t *obj) {
  for (size_t i = 0; i < n; i++) {
    if (s[i] != ',') continue;
    size_t j = i + 1;
    while (j < n && is_space(s[j])) j++;
    if (n - j < 8 || memcmp(s + j, "\"usage\":", 8) != 0) continue;
    j += 8;
    while (j < n && is_space(s[j])) j++;
    if (j >= n || s[j] != '{') continue;
    size_t depth = 0;
    for (size_t e = j; e < n; e++) {
      if (s[e] == '{') depth++;
      if (s[e] == '}' && --depth == 0) {
        *from = i;
        *obj = j;
        *to = e + 1;
        return true;
      }
    }
  }
  return false;
}

/* An event of TGI's own /generate_stream, which the per-model proxy passes as it is: one token
 * each; the last one's details hold TGI's counts (the prompt: the estimate if they lack it). */
static void tgi_own_event(meter *m, const char *ev, size_t n) {
  long long c, p;
  m->counted++;
  if (find(ev, n, "\"details\":{", 11) == NULL ||
      !number_after(ev, n, "\"generated_tokens\":", 19, &c))
    return;
  m->estimated = !number_after(ev, n, "\"input_length\":", 15, &p);
  m->prompt = m->estimated ? m->prompt_estimate : p;
  m->completion = c;
  m->have_usage = true;
}

#define ROLE_ONLY "\"delta\":{\"role\":\"assistant\",\"content\":\"\"}"
#define ROLE_ONLY_OPENAI "\"delta\":{\"role\":\"assistant\",\"content\":\"\",\"refusal\":null}"

static bool role_only(const char *ev, size_t n) {
  return (find(ev, n, ROLE_ONLY, sizeof ROLE_ONLY - 1) != NULL ||
          find(ev, n, ROLE_ONLY_OPENAI, sizeof ROLE_ONLY_OPENAI - 1) != NULL) &&
         find(ev, n, "\"finish_reason\":null", 20) != NULL;
}

/* The event without its whitespace, for the shape checks below, when its JSON has spaces (as
 * Python's json.dumps writes it: "choices": [{...}]); NULL when it is compact (vLLM, TGI,
 * OpenAI), the common case. A quote inside a JSON string is escaped, so no key pattern can
 * match inside one. */
static char *compact(const char *ev, size_t n, size_t *len) {
  if (find(ev, n, "\": ", 3) == NULL && find(ev, n, ", \"", 3) == NULL) return NULL;
  char *c = malloc(n);
  if (c == NULL) return NULL;
  size_t k = 0;
  for (size_t i = 0; i < n; i++)
    if (!is_space(ev[i])) c[k++] = ev[i];
  *len = k;
  return c;
}

static void rewrite_event(meter *m, const char *ev, size_t n, bytes *out) {
  if (n == 12 && memcmp(ev, "data: [DONE]", 12) == 0) {
    figures(m, out);
    put(out, "data: [DONE]\n\n", 14);
    return;
  }
  size_t sn = n;
  char *spaced = compact(ev, n, &sn);
  const char *s = spaced != NULL ? spaced : ev; /* what the shape checks read */
  if (find(s, sn, "\"choices\":[]", 12) != NULL) { /* the usage-only event */
    free(spaced);
    counts(m, ev, n);
    if (m->keep_usage) {
      put(out, ev, n);
      put(out, "\n\n", 2);
    }
    return;
  }
  /* no token yet: no usage, or vLLM's running usage with none generated (its role chunk's) */
  bool none_yet = m->counted == 0 && (!m->have_usage || m->completion == 0);
  if (none_yet && n > 5 && memcmp(ev, "data:", 5) == 0) {
    size_t i = 5;
    while (i < n && is_space(ev[i])) i++;
    /* nothing made: {"error": ...}, or vLLM's older {"object": "error", ...} */
    if ((n - i >= 8 && memcmp(ev + i, "{\"error\"", 8) == 0) ||
        (n - i >= 18 && memcmp(ev + i, "{\"object\":\"error\"", 18) == 0))
      m->failed = true;
  }
  /* an SSE error event (the envelope dialect writes the error so, before this meter) */
  if (none_yet && n >= 12 && memcmp(ev, "event: error", 12) == 0)
    m->failed = true;
  /* a chunk with a choice: a token, but for the closing one with an empty delta and an opening
   * one with the role alone (TGI's last, with its reason, is its end-of-sequence token) */
  if (!m->have_usage && find(s, sn, "\"choices\":[{", 12) != NULL &&
      find(s, sn, "\"delta\":{}", 10) == NULL && !role_only(s, sn))
    m->counted++;
  else if (!m->have_usage && find(s, sn, "\"token\":{", 9) != NULL)
    tgi_own_event(m, s, sn);
  free(spaced);
  size_t from, to, obj;
  if (usage_object(ev, n, &from, &to, &obj)) { /* vLLM's running usage: read, cut out */
    counts(m, ev + obj, to - obj);
    put(out, ev, from);
    put(out, ev + to, n - to);
  } else {
    put(out, ev, n);
  }
  put(out, "\n\n", 2);
}

/* ---- Envoy's hooks ---- */

const char *envoy_dynamic_module_on_program_init(void) { return "v0.1.0"; }

static const char config_token = 1;

const void *envoy_dynamic_module_on_http_filter_config_new(void *config_envoy, tg_buf name,
                                                           tg_buf config) {
  (void)config_envoy;
  (void)name;
  (void)config;
  return &config_token;
}

void envoy_dynamic_module_on_http_filter_config_destroy(const void *config) { (void)config; }

const void *envoy_dynamic_module_on_http_filter_new(const void *config, void *f) {
  (void)config;
  (void)f;
  return calloc(1, sizeof(meter));
}

void envoy_dynamic_module_on_http_filter_destroy(const void *module) {
  meter *m = (meter *)module;
  if (m == NULL) return;
  free(m->request_id);
  free(m->tail.p);
  free(m);
}

int envoy_dynamic_module_on_http_filter_request_headers(void *f, const void *m, bool eos) {
  (void)f, (void)m, (void)eos;
  return 0;
}

int envoy_dynamic_module_on_http_filter_request_body(void *f, const void *m, bool eos) {
  (void)f, (void)m, (void)eos;
  return 0;
}

int envoy_dynamic_module_on_http_filter_request_trailers(void *f, const void *m) {
  (void)f, (void)m;
  return 0;
}

int envoy_dynamic_module_on_http_filter_response_headers(void *f, const void *module, bool eos) {
  meter *m = (meter *)module;
  tg_buf mark = {NULL, 0};
  if (m == NULL || eos ||
      !envoy_dynamic_module_callback_http_get_header(f, HDR_RESPONSE, LIT("x-tollgate-lua-meter"),
                                                     &mark, 0, NULL) ||
      mark.ptr == NULL)
    return 0;
  envoy_dynamic_module_callback_http_set_header(f, HDR_RESPONSE, LIT("x-tollgate-lua-meter"),
                                                (tg_buf){NULL, 0});
  /* the processor's cue for the stream_trailers filter, done with */
  envoy_dynamic_module_callback_http_set_header(f, HDR_RESPONSE, LIT("x-tollgate-trailers"),
                                                (tg_buf){NULL, 0});
  bool stream = false;
  if (!envoy_dynamic_module_callback_http_get_metadata_bool(f, MD_DYNAMIC, LIT("tollgate"),
                                                            LIT("stream"), &stream) ||
      !stream)
    return 0;
  tg_buf ct = {NULL, 0};
  if (!envoy_dynamic_module_callback_http_get_header(f, HDR_RESPONSE, LIT("content-type"), &ct, 0,
                                                     NULL) ||
      ct.ptr == NULL || find(ct.ptr, ct.length, "text/event-stream", 17) == NULL)
    return 0;
  tg_buf rid = {NULL, 0};
  if (envoy_dynamic_module_callback_http_get_metadata_string(f, MD_DYNAMIC, LIT("tollgate"),
                                                             LIT("request_id"), &rid) &&
      rid.ptr != NULL && rid.length > 0) {
    m->request_id = malloc(rid.length);
    if (m->request_id != NULL) {
      memcpy(m->request_id, rid.ptr, rid.length);
      m->request_id_len = rid.length;
    }
  }
  bool keep = false;
  envoy_dynamic_module_callback_http_get_metadata_bool(f, MD_DYNAMIC, LIT("tollgate"),
                                                       LIT("keep_usage"), &keep);
  m->keep_usage = keep;
  md_number(f, LIT("price_in"), &m->price_in);
  md_number(f, LIT("price_out"), &m->price_out);
  md_number(f, LIT("price_req"), &m->price_req);
  md_number(f, LIT("available"), &m->available);
  if (!md_number(f, LIT("balance"), &m->balance)) m->balance = m->available;
  md_number(f, LIT("prompt_estimate"), &m->prompt_estimate);
  m->active = true;
  return 0;
}

int envoy_dynamic_module_on_http_filter_response_body(void *f, const void *module, bool eos) {
  meter *m = (meter *)module;
  if (m == NULL || !m->active) return 0;
  if (!m->seen_body) {
    /* the backend's first body chunk comes with its first token: time to first token */
    m->seen_body = true;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    char us[32];
    int n = snprintf(us, sizeof us, "%lld",
                     (long long)ts.tv_sec * 1000000LL + (long long)(ts.tv_nsec / 1000));
    envoy_dynamic_module_callback_http_set_dynamic_metadata_string(
        f, LIT("tollgate.timing"), LIT("first_chunk_us"), (tg_buf){us, (size_t)n});
  }
  size_t count = envoy_dynamic_module_callback_http_get_body_chunks_size(f, BODY_RECEIVED_RESPONSE);
  tg_buf stack[16];
  tg_buf *chunks = count <= 16 ? stack : malloc(count * sizeof(tg_buf));
  if (chunks == NULL) return 0;
  size_t size = 0;
  if (count > 0 &&
      envoy_dynamic_module_callback_http_get_body_chunks(f, BODY_RECEIVED_RESPONSE, chunks)) {
    for (size_t i = 0; i < count; i++) {
      put_lf(m, chunks[i].ptr, chunks[i].length);
      size += chunks[i].length;
    }
  }
  if (chunks != stack) free(chunks);
  bytes out = {0};
  const char *data = m->tail.p;
  size_t pos = 0, n = m->tail.n;
  for (;;) {
    const char *sep = find(data + pos, n - pos, "\n\n", 2);
    if (sep == NULL) break;
    size_t end = (size_t)(sep - data);
    rewrite_event(m, data + pos, end - pos, &out);
    pos = end + 2;
  }
  if (eos) { /* a last event without its blank line ("data: [DONE]" and the end) */
    size_t end = n;
    while (end > pos && data[end - 1] == '\n') end--;
    if (end > pos) rewrite_event(m, data + pos, end - pos, &out);
    pos = n;
  }
  memmove(m->tail.p, data + pos, n - pos);
  m->tail.n = n - pos;
  if (size > 0) envoy_dynamic_module_callback_http_drain_body(f, BODY_RECEIVED_RESPONSE, size);
  if (out.n > 0)
    envoy_dynamic_module_callback_http_append_body(f, BODY_RECEIVED_RESPONSE,
                                                   (tg_buf){out.p, out.n});
  free(out.p);
  return 0;
}

int envoy_dynamic_module_on_http_filter_response_trailers(void *f, const void *module) {
  meter *m = (meter *)module;
  if (m == NULL || !m->active) return 0;
  counted_usage(m);
  if (!m->have_usage) return 0;
  /* the trailer map the stream_trailers filter made; over HTTP/1.1 Envoy drops it */
  char used[40], remaining[40];
  charge(m, used, remaining, sizeof used);
  envoy_dynamic_module_callback_http_add_header(f, HDR_RESPONSE_TRAILER, LIT("x-credits-used"),
                                                (tg_buf){used, strlen(used)});
  envoy_dynamic_module_callback_http_add_header(f, HDR_RESPONSE_TRAILER,
                                                LIT("x-credits-remaining"),
                                                (tg_buf){remaining, strlen(remaining)});
  return 0;
}

/* Hooks Envoy requires of every HTTP filter module; this one has nothing to do in them. */

/* The stream is over (it ended, or the client or the backend cut it): its latest usage, for
 * the access log that hands it to the settling worker. Envoy runs this before its access logs;
 * written once here rather than on every chunk that moved it (the Lua meter's way). */
void envoy_dynamic_module_on_http_filter_stream_complete(void *f, const void *module) {
  meter *m = (meter *)module;
  if (m == NULL || !m->active) return;
  counted_usage(m);
  if (!m->have_usage) { /* cut before its first token (in the queue, in the prefill) */
    m->prompt = m->prompt_estimate;
    m->completion = 0;
    m->estimated = true;
  }
  envoy_dynamic_module_callback_http_set_dynamic_metadata_number(
      f, LIT("tollgate.usage"), LIT("prompt_tokens"), (double)m->prompt);
  envoy_dynamic_module_callback_http_set_dynamic_metadata_number(
      f, LIT("tollgate.usage"), LIT("completion_tokens"), (double)m->completion);
  if (m->failed) /* the settling worker voids it (settle_service.py) */
    envoy_dynamic_module_callback_http_set_dynamic_metadata_number(f, LIT("tollgate.usage"),
                                                                   LIT("failed"), 1);
  else if (m->estimated) /* the ledger entry says the tokens were counted */
    envoy_dynamic_module_callback_http_set_dynamic_metadata_number(f, LIT("tollgate.usage"),
                                                                   LIT("counted"), 1);
}

void envoy_dynamic_module_on_http_filter_http_callout_done(void *f, const void *m, uint64_t id,
                                                           int result, void *headers, size_t nh,
                                                           void *chunks, size_t nc) {
  (void)f, (void)m, (void)id, (void)result, (void)headers, (void)nh, (void)chunks, (void)nc;
}

void envoy_dynamic_module_on_http_filter_http_stream_headers(void *f, const void *m, uint64_t id,
                                                             void *headers, size_t n, bool eos) {
  (void)f, (void)m, (void)id, (void)headers, (void)n, (void)eos;
}

void envoy_dynamic_module_on_http_filter_http_stream_data(void *f, const void *m, uint64_t id,
                                                          const void *data, size_t n, bool eos) {
  (void)f, (void)m, (void)id, (void)data, (void)n, (void)eos;
}

void envoy_dynamic_module_on_http_filter_http_stream_trailers(void *f, const void *m, uint64_t id,
                                                              void *trailers, size_t n) {
  (void)f, (void)m, (void)id, (void)trailers, (void)n;
}

void envoy_dynamic_module_on_http_filter_http_stream_complete(void *f, const void *m,
                                                              uint64_t id) {
  (void)f, (void)m, (void)id;
}

void envoy_dynamic_module_on_http_filter_http_stream_reset(void *f, const void *m, uint64_t id,
                                                           int reason) {
  (void)f, (void)m, (void)id, (void)reason;
}

void envoy_dynamic_module_on_http_filter_scheduled(void *f, const void *m, uint64_t id) {
  (void)f, (void)m, (void)id;
}

void envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
    void *f, const void *m) {
  (void)f, (void)m;
}

void envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
    void *f, const void *m) {
  (void)f, (void)m;
}
