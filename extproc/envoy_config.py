"""Render the Envoy bootstrap from the gateway config (``tollgate render-envoy`` prints it).

Shape of what Envoy does for the processor (see README, "Request path"):

* One listener; ``x-request-id`` kept from the client or generated, echoed on every response.
* The ext_proc filter, fail-closed (``failure_mode_allow: false``, ``status_on_error: 503``),
  by default sending request headers, the BUFFERED request body and the response headers: three
  messages per request. Response bodies reach the processor only when it asks for them with a
  mode override (backend error to normalize, aliased model to rewrite). ``GET /v1/models`` is
  headers-only.
* Routing: the processor sets ``x-tollgate-backend`` on the body message and clears the route
  cache; one route per backend matches that header and carries the backend's timeout and retry
  policy. Requests without the header fall through to a 404 that only an unauthenticated or
  unknown path can reach (the processor answers those itself).
* Audio and images: one route per media path, matched before the processor routes the request,
  leaves the usage filters out of its filter chain; uploads (transcriptions) send the processor
  only the head of the body (``_media_route``).
* One cluster per backend: health checks, circuit breaker at ``max_concurrent_requests``,
  outlier detection; one HTTP/2 cluster listing every processor worker.
* ``local_reply_config`` renders Envoy's own errors in the gateway's JSON shape
  (:data:`extproc.errors.ENVOY_LOCAL_REPLIES`), and in the envelope shape on envelope-dialect
  requests (:data:`ENVELOPE_CEL`).
* Request ids: Envoy keeps the client's ``x-request-id`` or makes one; the processor replaces an
  insane one (and rewrites the request header). Envoy's ``always_set_request_id_in_response``
  is off because it would echo the client's original id over the processor's: the processor
  sets ``x-request-id`` on every response it shapes, and each local reply mapper on Envoy's own.
* Tracing (when ``tracing.otlp_endpoint`` is set): Envoy's OpenTelemetry tracer exports over
  OTLP/gRPC; the ext_proc call carries the span context to the processor (``traceparent``
  gRPC metadata), whose spans join the same trace (``extproc/tracing.py``).
"""

from __future__ import annotations

import base64
import ipaddress
import re
from pathlib import Path
from typing import Any

import yaml

from . import control_routes, health
from .config import Backend, GatewayConfig
from .dialects import (
    DIALECT_KEY,
    ENVELOPE,
    ENVELOPE_PREFIX,
    ENVELOPE_ROUTES,
    PROXY_PREFIX,
    PROXY_UPLOADS,
)
from .errors import ENVOY_LOCAL_REPLIES, local_reply_body
from .operations import MEDIA_PATHS, UPLOAD_PATHS

ROUTE_HEADER = "x-tollgate-backend"
REROUTE_FILTER = "tollgate.reroute"  # uploads: routes again once the processor has (_media_route)
_LUA_NAME = "envoy.filters.http.lua"
_JSON_NAME = "envoy.filters.http.json_to_metadata"
_SSE_NAME = "envoy.filters.http.sse_to_metadata"
STREAM_SUFFIX = "/stream"  # routing header value suffix of metered streams (names have no "/")
EXTPROC_CLUSTER = "tollgate_extproc"
FAILED_LOG = "tollgate_settle_failed"  # the access log of requests whose processor failed
ADMIN_CLUSTER = "tollgate_envoy_admin"  # Envoy's own admin, for GET /v1/models/{id}/health
OTLP_CLUSTER = "tollgate_otlp"
METADATA_NS = "tollgate"  # what the processor sets at request time (read by Lua and the log)
TIMING_NS = "tollgate.timing"  # the stream meter's first-chunk time (TTFT)
USAGE_NS = "tollgate.usage"  # usage lifted out of responses by json_to_metadata/sse_to_metadata
_LUA = Path(__file__).with_name("stream_meter.lua")
TRAILERS_FILTER = "tollgate.stream_trailers"  # empty trailers on metered streams (Lua fills them)
TRAILERS_HEADER = "x-tollgate-trailers"  # the processor's cue for TRAILERS_FILTER (response)
LUA_METER_HEADER = "x-tollgate-lua-meter"  # metered streams' routes mark their responses
NATIVE_METER_FILTER = "tollgate.stream_meter"  # stream_meter.c, where it could be built
_TRAILERS_WASM = Path(__file__).with_name("stream_trailers.wasm")  # built from the .wat beside it
_T = "type.googleapis.com/"
_RESPONSE_HEADER_INPUT = _T + "envoy.type.matcher.v3.HttpResponseHeaderMatchInput"
_SKIP_ACTION = _T + "envoy.extensions.filters.common.matcher.action.v3.SkipFilter"


def _dur(seconds: float) -> str:
    """Envoy durations are written '0.2s', never '200ms'."""
    return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _cluster(
    name: str, endpoints: list[tuple[str, int]], connect_timeout_s: float
) -> dict[str, Any]:
    static = all(_is_ip(h) for h, _ in endpoints)
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC" if static else "STRICT_DNS",
        "connect_timeout": _dur(connect_timeout_s),
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": _address(h, p)}} for h, p in endpoints]}
            ],
        },
    }
    if not static:
        # Servers often listen on IPv4 only while a name may resolve to ::1 first.
        cluster["dns_lookup_family"] = "V4_PREFERRED"
    return cluster


def backend_cluster(backend: Backend) -> dict[str, Any]:
    hosts = [(e.host, e.port) for e in backend.endpoints]
    cluster = _cluster(backend.cluster, hosts, backend.connect_timeout_s)
    hc = backend.health_check
    cluster.update(
        {
            "lb_policy": "LEAST_REQUEST",
            # Below uvicorn's (vLLM's) 5 s keep-alive, so Envoy never reuses a connection the
            # backend is about to close.
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": _T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "common_http_protocol_options": {"idle_timeout": "3s"},
                    "explicit_http_config": {"http_protocol_options": {}},
                }
            },
            "circuit_breakers": {
                "thresholds": [
                    {
                        "max_requests": backend.max_concurrent_requests,
                        "max_pending_requests": backend.max_concurrent_requests,
                        "max_connections": backend.max_concurrent_requests,
                        "max_retries": 16,
                    }
                ]
            },
            "health_checks": [
                {
                    "timeout": _dur(hc.timeout_s),
                    "interval": _dur(hc.interval_s),
                    "unhealthy_threshold": hc.unhealthy_threshold,
                    "healthy_threshold": hc.healthy_threshold,
                    "reuse_connection": True,
                    "http_health_check": {"path": hc.path},
                }
            ],
            "outlier_detection": {
                "consecutive_5xx": 5,
                "consecutive_gateway_failure": 3,
                "interval": "5s",
                "base_ejection_time": "10s",
                "max_ejection_percent": 50,
            },
        }
    )
    return cluster


def _ext_proc_filter(cfg: GatewayConfig) -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.ext_proc",
        "typed_config": {
            "@type": _T + "envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
            "grpc_service": {
                "envoy_grpc": {"cluster_name": EXTPROC_CLUSTER},
                "timeout": _dur(cfg.processor.message_timeout_s),
                # A worker that died is retried on another before the stream opens.
                "retry_policy": {
                    "retry_back_off": {"base_interval": "0.01s", "max_interval": "0.1s"},
                    "num_retries": 2,
                },
            },
            # Fail closed: a processor that cannot be reached means a 503, never a free request.
            "failure_mode_allow": False,
            "status_on_error": {"code": 503},
            "message_timeout": _dur(cfg.processor.message_timeout_s),
            "allow_mode_override": True,
            "processing_mode": {
                "request_header_mode": "SEND",
                "request_body_mode": "BUFFERED",
                "request_trailer_mode": "SKIP",
                "response_header_mode": "SEND",
                "response_body_mode": "NONE",
                "response_trailer_mode": "SKIP",
            },
            # :path (a backend's own endpoint, e.g. TGI /generate) and
            # x-envoy-upstream-rq-timeout-ms (X-Request-Timeout) are set by the processor.
            # Clients' own x-envoy-* headers are dropped by the connection manager before any
            # filter (no address is internal).
            "mutation_rules": {"allow_all_routing": True, "allow_envoy": True},
            # The response-headers message carries the usage json_to_metadata lifted out of a
            # non-streaming body (it holds the headers until the body is complete), so
            # settlement needs no response-body message.
            "metadata_options": {
                "forwarding_namespaces": {"untyped": [USAGE_NS]},
                "receiving_namespaces": {"untyped": [METADATA_NS]},
            },
            # The client's address for the failed-lookup limit (auth.py): Envoy's own view,
            # never a header the client wrote. The protocol: trailers only for HTTP/2 and up.
            "request_attributes": ["source.address", "request.protocol"],
            "stat_prefix": "tollgate",
        },
    }


def _transcoder() -> dict[str, Any]:
    """REST <-> gRPC for the control API (control_routes.py), from the proto's descriptors."""
    import base64

    return {
        "name": "envoy.filters.http.grpc_json_transcoder",
        "typed_config": {
            "@type": _T
            + "envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
            "proto_descriptor_bin": base64.b64encode(control_routes.descriptor_set()).decode(),
            "services": [control_routes.SERVICE_NAME],
            "print_options": {
                "always_print_primitive_fields": True,
                "preserve_proto_field_names": True,
            },
            "request_validation_options": {"reject_unknown_query_parameters": True},
        },
    }


def _control_routes(metered: bool) -> list[dict[str, Any]]:
    """The control API's REST paths (the processor authenticates; no body passes through it;
    it sees the response headers to render errors) and the transcoded gRPC call to a worker.
    A REST path the transcoder does not know stays on its route: a 404 in the gateway's shape."""
    no_lua = _no_lua(metered)
    rest = {**_ext_proc_mode(response_headers="SEND"), **no_lua}
    routes: list[dict[str, Any]] = [
        {
            "name": "control_grpc",
            "match": {"prefix": control_routes.GRPC_PREFIX},
            "route": {"cluster": EXTPROC_CLUSTER, "timeout": "15s"},
            "typed_per_filter_config": no_lua,
        }
    ]
    for root in control_routes.ROOTS:
        routes.append(
            {
                "name": "control" + root.replace("/", "_"),
                "match": {"path_separated_prefix": root},
                "direct_response": {"status": 404},
                "typed_per_filter_config": rest,
            }
        )
    return routes


def _usage_rules() -> list[dict[str, Any]]:
    """``usage.prompt_tokens`` / ``usage.completion_tokens`` of a JSON body or SSE event -> the
    usage namespace."""
    return [
        {
            "selectors": [{"key": "usage"}, {"key": key}],
            "on_present": {"metadata_namespace": USAGE_NS, "key": key, "type": "NUMBER"},
        }
        for key in ("prompt_tokens", "completion_tokens")
    ]


def _metering_filters() -> list[dict[str, Any]]:
    """Usage out of responses, natively: JSON bodies and SSE streams (last value wins)."""
    json_usage = {
        "name": _JSON_NAME,
        "typed_config": {
            "@type": _T + "envoy.extensions.filters.http.json_to_metadata.v3.JsonToMetadata",
            "response_rules": {
                # and an "error" key: a backend's error sent with 200 (voided, not charged)
                "rules": [
                    *_usage_rules(),
                    # its message (OpenAI's and vLLM's error object), or the error as a string
                    # (a fixed value would also be set for a body that does not parse)
                    *(
                        {
                            "selectors": path,
                            "on_present": {
                                "metadata_namespace": USAGE_NS,
                                "key": "error",
                                "type": "STRING",
                            },
                        }
                        for path in ([{"key": "error"}, {"key": "message"}], [{"key": "error"}])
                    ),
                ],
                "allow_content_types": ["application/json"],
                # and with parameters ("application/json; charset=utf-8", as Go's servers
                # write it): else the usage is not lifted and the answer is charged its
                # whole reservation
                "allow_content_types_regex": {"regex": r"(?i)application/json\s*;.*"},
            },
        },
    }
    filters = [
        _unless_large_response(json_usage),
        # Not on metered streams (their route marks the response): the Lua stream meter reads
        # their usage. The routing header cannot cue it: Envoy never gives the matcher of a
        # filter that only sees responses the request headers.
        _skipped_when(
            _SSE_NAME,
            _sse_filter(_SSE_NAME, _usage_rules()),
            _header_matches(_RESPONSE_HEADER_INPUT, LUA_METER_HEADER, ".+"),
        ),
    ]
    # TGI's own /generate_stream (the per-model proxy) is always a metered stream: the stream
    # meter reads its counts (one token per event, the last event's details). A filter with
    # TGI's rules here, as there once was, cost Envoy one JSON parse per event (~12 µs) on every
    # TGI stream for figures the meter already had.
    return filters


def _unless_large_response(filter_: dict[str, Any]) -> dict[str, Any]:
    """``filter_`` (json_to_metadata) skipped on responses of 1,000,000 bytes or more.

    json_to_metadata buffers the whole body, and above Envoy's buffer limit (at least 1 MiB,
    see ``listener.max_request_body_bytes``) the client would get a 500: a large embeddings
    answer, say. Such a response passes unread; its usage unknown, the processor charges the
    reservation (the prompt as estimated, see README "Credits")."""
    large = _header_matches(_RESPONSE_HEADER_INPUT, "content-length", "[0-9]{7,}")
    return _skipped_when(filter_["name"], filter_, large)


def _header_matches(input_type: str, header: str, regex: str) -> dict[str, Any]:
    return {
        "single_predicate": {
            "input": {"name": header, "typed_config": {"@type": input_type, "header_name": header}},
            "value_match": {"safe_regex": {"google_re2": {}, "regex": regex}},
        }
    }


def _skipped_when(name: str, filter_: dict[str, Any], predicate: dict[str, Any]) -> dict[str, Any]:
    """``filter_`` wrapped so that Envoy skips it on requests ``predicate`` matches."""
    skip = {"name": "skip", "typed_config": {"@type": _SKIP_ACTION}}
    return {
        "name": name,
        "typed_config": {
            "@type": _T + "envoy.extensions.common.matching.v3.ExtensionWithMatcher",
            "extension_config": filter_,
            "xds_matcher": {
                "matcher_list": {
                    "matchers": [{"predicate": predicate, "on_match": {"action": skip}}]
                }
            },
        },
    }


def _sse_filter(name: str, rules: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": name,
        "typed_config": {
            "@type": _T + "envoy.extensions.filters.http.sse_to_metadata.v3.SseToMetadata",
            "response_rules": {
                "content_parser": {
                    "name": "envoy.content_parsers.json",
                    "typed_config": {
                        "@type": _T + "envoy.extensions.content_parsers.json.v3.JsonContentParser",
                        "rules": [{"rule": r} for r in rules],
                    },
                }
            },
        },
    }


def _lua_filter() -> dict[str, Any]:
    # First in the chain, so on the response path it runs after ext_proc (placed after
    # ext_proc, its rewritten chunks were lost while ext_proc held the headers).
    code = _LUA.read_text()
    return {
        "name": _LUA_NAME,
        "typed_config": {
            "@type": _T + "envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": code},
        },
    }


def _native_meter_filter(module: Path) -> dict[str, Any]:
    """The native stream meter (``stream_meter.c``, built by native_meter.py), first in the
    chain like the Lua meter, which it replaces on the streams of every backend but TGI's native
    API (see _routes). It acts only on responses with the stream routes' mark."""
    return {
        "name": NATIVE_METER_FILTER,
        "typed_config": {
            "@type": _T + "envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter",
            "dynamic_module_config": {
                "name": "tollgate_meter",
                "module": {"local": {"filename": str(module)}},
            },
            "filter_name": "stream_meter",
        },
    }


def _trailers_filter() -> dict[str, Any]:
    """The empty trailers the Lua stream meter fills (see ``stream_trailers.wat``).

    Between the stream meters and ext_proc in the chain, so on the response path it runs after
    the processor and before the meters: at the last body chunk it creates the trailer map the
    stream meter writes the credit figures into. After the processor, because a stream whose
    chunks the processor translates must reach it with end_of_stream on its last chunk (the
    trailers would end the stream instead, and the translators finish a stream on
    end_of_stream). Only on the metered HTTP/2+ streams whose response headers the processor
    marks with TRAILERS_HEADER (the stream meters remove it). Measured cost: see README,
    "Speed"."""
    wasm = {
        "name": "envoy.filters.http.wasm",
        "typed_config": {
            "@type": _T + "envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": "stream_trailers",
                "vm_config": {
                    "vm_id": "stream_trailers",
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": {
                        "local": {
                            "inline_bytes": base64.b64encode(_TRAILERS_WASM.read_bytes()).decode()
                        }
                    },
                },
            },
        },
    }
    cued = _header_matches(_RESPONSE_HEADER_INPUT, TRAILERS_HEADER, "1")
    return _skipped_when(TRAILERS_FILTER, wasm, {"not_matcher": cued})


def _settle_logs() -> list[dict[str, Any]]:
    """Finished metered streams -> the processor's AccessLogService, which settles them; and
    requests whose processor failed (FAILED_LOG, below).

    Two loggers, both batched (up to 16 KB of records a message: sent one by one, a record
    cost the worker ~180 µs and the store ~55 µs more a stream). Most streams wait up to 20 ms
    for their batch; the streams of a key with a concurrency or tokens-per-minute limit, and
    those reserved on a low balance (the processor marks them settle_now, Meter.settles_now),
    at most 2 ms, as their settlement frees the slot, the tokens or the credits the key's next
    request needs: at 0.2 s a client streaming one request after another met 429s after each
    stream. Measured (stream.js, 64 VUs): 2 ms costs no more than 0.2 s
    (1,270 against 1,246 req/s), one record a message 13% of the throughput; 20 ms against
    0.2 s (three interleaved rounds, stream.js and paced-stream): no difference. Under full load
    the 16 KB buffer, not the interval, ends a batch (~19 records)."""

    def logger(name: str, now: bool) -> dict[str, Any]:
        # the processor sets settle_now (true or false) on every metered stream, and on nothing
        # else: the rest it settles itself
        path = [{"key": "settle_now"}]
        mark = {"filter": METADATA_NS, "path": path, "value": {"bool_match": now}}
        return {
            "name": "envoy.access_loggers.http_grpc",
            "filter": {"metadata_filter": {"matcher": mark, "match_if_key_not_found": False}},
            "typed_config": {
                "@type": _T + "envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
                "common_config": {
                    "log_name": name,
                    "grpc_service": {"envoy_grpc": {"cluster_name": EXTPROC_CLUSTER}},
                    "transport_api_version": "V3",
                    "buffer_flush_interval": "0.002s" if now else "0.02s",
                    "buffer_size_bytes": 16384,
                },
            },
        }

    # A request whose processor failed mid-way (a worker died: Envoy answers 503, its
    # code details "ext_proc_error_..."): what it reserved is voided by another worker
    # (settle_service.py) instead of charged in full by the sweeper once it times out. The
    # status is compared first, so every other request costs Envoy one integer comparison.
    status = {"comparison": {"op": "EQ", "value": {"default_value": 503, "runtime_key": "-"}}}
    failed = logger(FAILED_LOG, True)
    # its records come just as a worker died, when Envoy may still pick that worker for the
    # log's stream: a stream that cannot connect tries another worker, replaying what it sent
    # (Envoy keeps the first 64 KB of a stream for that). Only this rarely used log has it: on
    # a settling log's long-lived stream a replay would be the oldest 64 KB of records, already
    # settled, and not the ones in flight to a dying worker (those are the sweeper's).
    failed["typed_config"]["common_config"]["grpc_service"]["retry_policy"] = {
        "retry_on": "connect-failure,refused-stream,unavailable,reset",
        "num_retries": 3,
        "retry_back_off": {"base_interval": "0.1s", "max_interval": "1s"},
        "retry_host_predicate": [
            {
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": {
                    "@type": _T
                    + "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
                },
            }
        ],
        "host_selection_retry_max_attempts": 5,
    }
    failed["filter"] = {
        "and_filter": {
            "filters": [
                {"status_code_filter": status},
                _cel_filter("response.code_details.startsWith('ext_proc_error')"),
            ]
        }
    }
    return [logger("tollgate_settle", False), logger("tollgate_settle_now", True), failed]


def _ext_proc_mode(response_headers: str = "SKIP", response_body: str = "NONE") -> dict[str, Any]:
    """A route's ext_proc override: request headers only, plus what of the response it needs."""
    return {
        "envoy.filters.http.ext_proc": {
            "@type": _T + "envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
            "overrides": {
                "processing_mode": {
                    "request_header_mode": "SEND",
                    "request_body_mode": "NONE",
                    "response_header_mode": response_headers,
                    "response_body_mode": response_body,
                }
            },
        }
    }


def _media_route(path: str, upload: bool, cfg: GatewayConfig) -> dict[str, Any]:
    """Audio and images (``extproc/media.py``), matched by path before the processor routes them.

    Envoy makes a request's filter chain for the route it first matches, so this is where the
    filters a media answer has no use for are left out: its usage is never read from the answer
    (the stream meter, json_to_metadata, sse_to_metadata), and json_to_metadata would hold a
    whole image answer (``b64_json``) in memory, answering 500 for one over the buffer limit.

    Uploads (``upload``): the processor gets the head of the body, Envoy streams the rest to the
    backend. BUFFERED_PARTIAL is set here, on the route, rather than by a mode override from the
    processor, so that it already holds while the request headers are with the processor (in
    the filter's default BUFFERED mode, body arriving meanwhile beyond the buffer limit is
    refused with 413). Envoy drops Content-Length in this body mode: the upload goes on chunked.
    When the head is only part of the body, ext_proc passes it on down the filter chain before
    it would apply the processor's clear_route_cache (and clearing the route then crashed
    Envoy 1.40), so the processor does not ask for it; the reroute filter, after ext_proc and
    enabled only here, clears the route cache, and the router finds the backend route the
    processor's routing header names.
    """
    per_filter = _usage_filters_off(cfg)
    if upload:
        per_filter.update(_request_body_mode("BUFFERED_PARTIAL"))
        per_filter[REROUTE_FILTER] = {
            "@type": _T + "envoy.extensions.filters.http.lua.v3.LuaPerRoute",
            "source_code": {"inline_string": _REROUTE_LUA},
        }
    return {
        "name": "media" + path.replace("/", "_"),
        "match": {"path": path},
        "direct_response": {"status": 404},  # only if the processor did not route it
        "typed_per_filter_config": per_filter,
    }


def _usage_filters_off(cfg: GatewayConfig) -> dict[str, Any]:
    """A route's per-filter config leaving out the filters that read usage from answers (they
    exist only when metering is on)."""
    if not cfg.metering.enabled:
        return {}
    off = {"@type": _T + "envoy.config.route.v3.FilterConfig", "disabled": True}
    return {name: dict(off) for name in (_LUA_NAME, _JSON_NAME, _SSE_NAME)}


def _request_body_mode(mode: str) -> dict[str, Any]:
    return {
        "envoy.filters.http.ext_proc": {
            "@type": _T + "envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
            "overrides": {"processing_mode": {"request_body_mode": mode}},
        }
    }


def _proxy_upload_route(cfg: GatewayConfig) -> dict[str, Any]:
    """Per-model proxy uploads (``transcript``, ``translate``): the processor routes them from
    the request headers and never reads the body, so ext_proc is told so here, before the
    headers go to the processor. In the default BUFFERED mode ext_proc held the body arriving
    while the processor answered, and an upload past Envoy's buffer limit met a 413. The
    answer's usage is never read (priced per request), so the usage filters stay out too."""
    names = "|".join(re.escape(name) for name in PROXY_UPLOADS)
    per_filter = {**_usage_filters_off(cfg), **_request_body_mode("NONE")}
    return {
        "name": "proxy_uploads",
        "match": {"safe_regex": {"regex": f"^{re.escape(PROXY_PREFIX)}[^/]+/proxy/v1/({names})$"}},
        "direct_response": {"status": 404},  # only if the processor did not route it
        "typed_per_filter_config": per_filter,
    }


_REROUTE_LUA = "function envoy_on_request(handle) handle:clearRouteCache() end"


def _reroute_filter() -> dict[str, Any]:
    """Off by default; the upload routes turn it on with their script (see _media_route)."""
    return {
        "name": REROUTE_FILTER,
        "disabled": True,
        "typed_config": {"@type": _T + "envoy.extensions.filters.http.lua.v3.Lua"},
    }


def _no_lua(metered: bool) -> dict[str, Any]:
    """The Lua stream meter disabled on a route (it only exists when metering is on)."""
    if not metered:
        return {}
    return {
        "envoy.filters.http.lua": {
            "@type": _T + "envoy.extensions.filters.http.lua.v3.LuaPerRoute",
            "disabled": True,
        }
    }


def _backend_route(b: Backend, header_value: str) -> dict[str, Any]:
    return {
        "name": f"to_{header_value}",
        "match": {
            "prefix": "/",
            "headers": [{"name": ROUTE_HEADER, "string_match": {"exact": header_value}}],
        },
        "route": {
            "cluster": b.cluster,
            "timeout": _dur(b.request_timeout_s),
            "retry_policy": {
                "retry_on": "connect-failure,refused-stream",
                "num_retries": 2,
                "retry_host_predicate": [
                    {
                        "name": "envoy.retry_host_predicates.previous_hosts",
                        "typed_config": {
                            "@type": _T
                            + "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
                        },
                    }
                ],
                "host_selection_retry_max_attempts": 3,
            },
        },
        # The client's gateway credential never reaches a backend.
        "request_headers_to_remove": [ROUTE_HEADER, "authorization", "cookie"],
    }


def stream_route_value(backend_name: str) -> str:
    """The routing header's value for a metered stream to ``backend_name``."""
    return backend_name + STREAM_SUFFIX


def _routes(cfg: GatewayConfig, native_meter: bool = False) -> list[dict[str, Any]]:
    # The control API's transcoded calls first: a client's routing header cannot divert them.
    routes: list[dict[str, Any]] = _control_routes(cfg.metering.enabled)
    for b in cfg.backends:
        # Two routes per backend: metered streams (a stream meter runs) and the rest (Lua
        # disabled per route: measured, it cost ~30% of the metered throughput on requests it
        # had nothing to do for). With the native meter, Lua meters only the streams of TGI's
        # native API (their translation lives in stream_meter.lua); the native meter skips
        # those, as the Lua meter removes the mark before it runs.
        lua_streams = not native_meter or (b.kind == "tgi" and b.mode == "native")
        for value, lua_on in ((stream_route_value(b.name), lua_streams), (b.name, False)):
            route = _backend_route(b, value)
            per_filter: dict[str, Any] = {}
            if cfg.metering.enabled and not lua_on:
                per_filter.update(_no_lua(True))
            if cfg.metering.enabled and value != b.name:
                # the mark _metering_filters reads; the stream meter removes it
                route["response_headers_to_add"] = [
                    {
                        "header": {"key": LUA_METER_HEADER, "value": "1"},
                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                    }
                ]
            if per_filter:
                route["typed_per_filter_config"] = per_filter
            routes.append(route)
    # Model health: the processor sends it to Envoy's own admin (/clusters) and maps the answer.
    routes.append(
        {
            "name": "model_health",
            "match": {
                "safe_regex": {"regex": "^/v1/models/.+/health$"},
                "headers": [{"name": ":method", "string_match": {"exact": "GET"}}],
            },
            "direct_response": {"status": 404},
            "typed_per_filter_config": {
                **_ext_proc_mode(response_headers="SEND", response_body="BUFFERED"),
                **_no_lua(cfg.metering.enabled),
            },
        }
    )
    routes.append(
        {
            "name": "envoy_admin",
            "match": {
                "path": "/clusters",
                "headers": [{"name": ROUTE_HEADER, "string_match": {"exact": health.ADMIN_ROUTE}}],
            },
            "route": {"cluster": ADMIN_CLUSTER, "timeout": "2s"},
            "request_headers_to_remove": [ROUTE_HEADER, "authorization", "cookie"],
        }
    )
    # Answered by the processor from the config; never forwarded.
    routes.append(
        {
            "name": "models",
            "match": {
                "prefix": "/v1/models",
                "headers": [{"name": ":method", "string_match": {"exact": "GET"}}],
            },
            "direct_response": {"status": 404},
            "typed_per_filter_config": _ext_proc_mode(),
        }
    )
    # Audio and images (see _media_route).
    routes += [_media_route(path, path in UPLOAD_PATHS, cfg) for path in MEDIA_PATHS]
    # the envelope dialect's names for the same operations get the same routes
    routes += [
        _media_route(ENVELOPE_PREFIX + name, r.openai_path in UPLOAD_PATHS, cfg)
        for name, r in ENVELOPE_ROUTES.items()
        if r.openai_path in MEDIA_PATHS
    ]
    routes.append(_proxy_upload_route(cfg))
    # Everything else: the processor answers (401/404/...) or sets the routing header.
    routes.append(
        {"name": "unrouted", "match": {"prefix": "/"}, "direct_response": {"status": 404}}
    )
    return routes


def _ratio_sampler(ratio: float) -> dict[str, Any]:
    """OpenTelemetry's parent-based trace-id-ratio sampler for Envoy's tracer.

    HCM's ``random_sampling`` cannot do this here: with ``use_request_id_for_trace_sampling``
    off (client ids need not be UUIDs), Envoy marks every request "sampled" before looking at it.
    The tracer's own sampler decides instead; a client's sampled ``traceparent`` is honoured."""
    ext = _T + "envoy.extensions.tracers.opentelemetry.samplers.v3."
    return {
        "name": "envoy.tracers.opentelemetry.samplers.parent_based",
        "typed_config": {
            "@type": ext + "ParentBasedSamplerConfig",
            "wrapped_sampler": {
                "name": "envoy.tracers.opentelemetry.samplers.trace_id_ratio_based",
                "typed_config": {
                    "@type": ext + "TraceIdRatioBasedSamplerConfig",
                    "sampling_percentage": {
                        "numerator": round(ratio * 1_000_000),
                        "denominator": "MILLION",
                    },
                },
            },
        },
    }


def _cel_filter(expression: str) -> dict[str, Any]:
    return {
        "extension_filter": {
            "name": "envoy.access_loggers.extension_filters.cel",
            "typed_config": {
                "@type": _T + "envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter",
                "expression": expression,
            },
        }
    }


# A request of the envelope dialect: its path (before the processor rewrote it to the backend's)
# or the marker the processor sets in the body phase (after the rewrite). CEL's || is true when
# either side is, even if the other is an error (the marker is missing on other requests).
ENVELOPE_CEL = (
    f"(request.path.startsWith('{ENVELOPE_PREFIX}')"
    f" || metadata.filter_metadata['{METADATA_NS}']['{DIALECT_KEY}'] == '{ENVELOPE}')"
)


def _local_reply_config() -> dict[str, Any]:
    """Envoy's own errors in the gateway's shapes: for each entry of ENVOY_LOCAL_REPLIES a mapper
    for the envelope dialect first, then the one for every other request (first match wins)."""
    mappers = []
    for match, status, code, message in ENVOY_LOCAL_REPLIES:
        if match.startswith("flags:"):
            flt: dict[str, Any] = {"response_flag_filter": {"flags": match[6:].split(",")}}
        else:
            flt = _cel_filter(match)
        for envelope in (True, False):
            mapper: dict[str, Any] = {
                "filter": (
                    {"and_filter": {"filters": [flt, _cel_filter(ENVELOPE_CEL)]}}
                    if envelope
                    else flt
                ),
                "body_format_override": {
                    "json_format": local_reply_body(code, message, envelope),
                    "content_type": "application/json",
                },
            }
            if status:
                mapper["status_code"] = status
            mapper["headers_to_add"] = [_REQUEST_ID_HEADER]
            mappers.append(mapper)
    # Every other local reply of Envoy's own keeps its body but still carries the request id.
    mappers.append(
        {
            "filter": _cel_filter("!response.code_details.startsWith('tollgate')"),
            "headers_to_add": [_REQUEST_ID_HEADER],
        }
    )
    return {"mappers": mappers}


_REQUEST_ID_HEADER = {
    "header": {"key": "x-request-id", "value": "%REQ(X-REQUEST-ID)%"},
    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
}


def _access_log() -> list[dict[str, Any]]:
    return [
        {
            "name": "envoy.access_loggers.stdout",
            "typed_config": {
                "@type": _T + "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
                "log_format": {
                    "json_format": {
                        "time": "%START_TIME%",
                        # the response's: the processor's replacement for an insane client id
                        "request_id": "%RESP(X-REQUEST-ID)%",
                        "method": "%REQ(:METHOD)%",
                        "path": "%REQ(:PATH)%",
                        "status": "%RESPONSE_CODE%",
                        "flags": "%RESPONSE_FLAGS%",
                        "details": "%RESPONSE_CODE_DETAILS%",
                        "backend": "%UPSTREAM_CLUSTER%",
                        "upstream": "%UPSTREAM_HOST%",
                        "duration_ms": "%DURATION%",
                        "bytes_sent": "%BYTES_SENT%",
                    }
                },
            },
        }
    ]


def render(cfg: GatewayConfig, native_meter: Path | None = None) -> dict[str, Any]:
    """The Envoy bootstrap for ``cfg`` as a plain dict; ``native_meter``: the built native
    stream meter (native_meter.py) to use in place of the Lua meter, where it can."""
    metered = cfg.metering.enabled
    native = native_meter is not None and metered
    hcm: dict[str, Any] = {
        "@type": _T
        + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "tollgate",
        "codec_type": "AUTO",
        "generate_request_id": True,
        "preserve_external_request_id": True,
        "always_set_request_id_in_response": False,  # see the module docstring
        # Client ids need not be UUIDs: don't keep the sampling decision inside the id (a
        # non-UUID id would make every such request "not traceable").
        "request_id_extension": {
            "typed_config": {
                "@type": _T + "envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig",
                "pack_trace_reason": False,
                "use_request_id_for_trace_sampling": False,
            }
        },
        # Clients are never trusted with x-envoy-* request headers: no address is internal. An
        # empty list would mean Envoy's default (loopback and RFC 1918 are internal), so the one
        # range is TEST-NET-1 (RFC 5737), which never appears as a client.
        "internal_address_config": {
            "cidr_ranges": [{"address_prefix": "192.0.2.1", "prefix_len": 32}]
        },
        # The client address (source.address for the processor) is the TCP peer's, or the
        # entry listener.trusted_proxy_hops names in X-Forwarded-For, which Envoy appends to.
        "use_remote_address": True,
        "xff_num_trusted_hops": cfg.listener.trusted_proxy_hops,
        "stream_idle_timeout": "300s",
        "local_reply_config": _local_reply_config(),
        "route_config": {
            "name": "tollgate",
            "virtual_hosts": [
                {"name": "tollgate", "domains": ["*"], "routes": _routes(cfg, native)}
            ],
        },
        "access_log": _settle_logs() if metered else [],
        "http_filters": [
            *([_native_meter_filter(native_meter)] if native_meter and native else []),
            *([_lua_filter()] if metered else []),
            *([_trailers_filter()] if metered and cfg.metering.stream_trailers else []),
            _ext_proc_filter(cfg),
            _reroute_filter(),
            _transcoder(),
            *(_metering_filters() if metered else []),
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": _T + "envoy.extensions.filters.http.router.v3.Router"},
            },
        ],
    }
    if cfg.envoy.access_log:
        hcm["access_log"] += _access_log()
    otlp = cfg.otlp_endpoint
    extra_clusters: list[dict[str, Any]] = []
    if otlp is not None:
        otel: dict[str, Any] = {
            "@type": _T + "envoy.config.trace.v3.OpenTelemetryConfig",
            "grpc_service": {"envoy_grpc": {"cluster_name": OTLP_CLUSTER}, "timeout": "1s"},
            "service_name": f"{cfg.tracing.service_name}-envoy",
        }
        if cfg.tracing.sample_ratio < 1.0:
            otel["sampler"] = _ratio_sampler(cfg.tracing.sample_ratio)
        hcm["tracing"] = {
            # No span of its own for the upstream call: measured, it cost Envoy ~40 µs on every
            # request, sampled or not (the ingress span already carries the upstream's timing
            # and cluster; the processor's spans show the gateway's share).
            "spawn_upstream_span": False,
            "provider": {"name": "envoy.tracers.opentelemetry", "typed_config": otel},
        }
        collector = _cluster(OTLP_CLUSTER, [(otlp.host, otlp.port)], 1.0)
        collector["typed_extension_protocol_options"] = _HTTP2
        extra_clusters.append(collector)
    runtime: dict[str, Any] = {}
    if otlp is not None:  # Envoy batches spans; flush every second rather than every five
        runtime["tracing.opentelemetry.flush_interval_ms"] = 1000
    p = cfg.processor
    workers = [(p.host, p.port + i) for i in range(p.workers)]
    extproc = _cluster(EXTPROC_CLUSTER, workers, 1.0)
    extproc.update(
        {
            "lb_policy": "LEAST_REQUEST",
            "typed_extension_protocol_options": _HTTP2,
            # A dead worker leaves the rotation within a second: TCP health checks, and
            # ejection on the first locally seen connect failure.
            "health_checks": [
                {
                    "timeout": "0.5s",
                    "interval": "1s",
                    "unhealthy_threshold": 1,
                    "healthy_threshold": 1,
                    "tcp_health_check": {},
                }
            ],
            "outlier_detection": {
                "split_external_local_origin_errors": True,
                "consecutive_local_origin_failure": 1,
                "interval": "1s",
                "base_ejection_time": "2s",
                "max_ejection_percent": 100,
            },
            # Every ext_proc stream is one request on this cluster: the processor sheds load
            # itself (max_inflight), so Envoy's default cap of 1024 must not do it first.
            "circuit_breakers": {
                "thresholds": [
                    {
                        "max_requests": 1_000_000,
                        "max_pending_requests": 1_000_000,
                        "max_connections": 1_000_000,
                    }
                ]
            },
        }
    )
    bootstrap: dict[str, Any] = {
        "node": {"id": "tollgate", "cluster": "tollgate"},
        "admin": {"address": _address("127.0.0.1", cfg.envoy.admin_port)},
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": _T + "envoy.extensions.resource_monitors."
                        "downstream_connections.v3.DownstreamConnectionsConfig",
                        "max_active_downstream_connections": 50000,
                    },
                }
            ]
        },
        "static_resources": {
            "listeners": [
                {
                    "name": "tollgate",
                    "address": _address(cfg.listener.host, cfg.listener.port),
                    "per_connection_buffer_limit_bytes": max(
                        cfg.listener.max_request_body_bytes, 1024 * 1024
                    ),
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                extproc,
                *(backend_cluster(b) for b in cfg.backends),
                _cluster(ADMIN_CLUSTER, [("127.0.0.1", cfg.envoy.admin_port)], 1.0),
                *extra_clusters,
            ],
        },
    }
    if runtime:
        bootstrap["layered_runtime"] = {"layers": [{"name": "static", "static_layer": runtime}]}
    return bootstrap


_HTTP2 = {
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": _T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}},
    }
}


def render_yaml(cfg: GatewayConfig, native_meter: Path | None = None) -> str:
    header = (
        "# Rendered by `tollgate render-envoy` from "
        f"{cfg.source}. Do not edit: change the gateway config.\n"
    )
    return header + yaml.safe_dump(render(cfg, native_meter), sort_keys=False, width=100)
