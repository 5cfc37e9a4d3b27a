"""One processor worker: a grpc.aio ext_proc server on ``processor.port + index``.

Workers are processes (one core each, the GIL binds a Python process to about one); Envoy lists
every worker as an endpoint of the ext_proc cluster. All shared state is in the store.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import sys

import grpc
import structlog
from envoy.service.accesslog.v3 import als_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

from . import logs, store
from .auth import Authenticator
from .config import GatewayConfig
from .control_api import ControlApi
from .ledger import Ledger
from .metering import Meter
from .metrics import Metrics, serve_metrics
from .processor import Processor
from .proto import admin_pb2_grpc
from .resp import ScriptClient
from .settle_service import SettleLog, sweep_forever
from .tracing import Tracing

READY_LINE = "processor worker ready"


async def serve(cfg: GatewayConfig, index: int) -> None:
    log = structlog.get_logger("tollgate.worker")
    client = store.connect(cfg.store_url)
    await client.ping()
    fast = None
    if cfg.store_url.startswith(("redis://", "unix://")):
        fast = ScriptClient(store.fast_url(cfg.store_url))
    ledger = Ledger(client, fast)
    metrics = Metrics(cfg.processor.metrics)
    meter = Meter(cfg, ledger, metrics)
    auth = Authenticator(client, cfg)
    tracing = Tracing(cfg, index)
    processor = Processor(cfg, auth, meter, metrics, tracing)
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_concurrent_streams", 100_000),
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ]
    )
    ep_grpc.add_ExternalProcessorServicer_to_server(processor, server)
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(SettleLog(meter, metrics, tracing), server)
    admin_pb2_grpc.add_AdminServicer_to_server(ControlApi(cfg, client, auth, ledger), server)
    port = cfg.processor.port + index
    server.add_insecure_port(f"{cfg.processor.bind_host}:{port}")
    await server.start()
    tracing.start()
    sweeper = asyncio.create_task(
        sweep_forever(
            ledger, cfg.metering.sweep_interval_s, metrics, cfg.metering.ledger_retention_s
        )
    )
    # key changes (auth.py) and, with several workers, the other workers' settled batches
    # (metering.py), on one subscription; after a reconnection every cached lookup is dropped
    handlers = {
        store.keys_channel(): auth.invalidate,
        store.settled_channel(): meter.settled_elsewhere,
    }
    invalidations = asyncio.create_task(
        store.follow(cfg.store_url, handlers, lambda: auth.invalidate("*"))
    )
    scrape = (
        await serve_metrics(metrics, cfg.processor.bind_host, cfg.processor.metrics_port + index)
        if cfg.processor.metrics
        else None
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # What exists now (modules, config, the grpc server) lives as long as the worker. Frozen,
    # the collector's full passes skip it: under load (chat.js, 64 VUs) such a pass paused the
    # loop ~34 ms every few seconds, and under 1 ms once frozen.
    gc.collect()
    gc.freeze()
    log.info("worker_ready", port=port, worker=index, frozen_objects=gc.get_freeze_count())
    print(f"{READY_LINE} port={port}", flush=True)
    await stop.wait()
    sweeper.cancel()
    invalidations.cancel()
    if scrape is not None:
        scrape.close()
    await server.stop(grace=2)
    meter.resends.close()
    await tracing.aclose()
    await client.aclose()


def run(cfg: GatewayConfig, index: int) -> int:
    logs.configure(f"worker-{index}")
    try:
        asyncio.run(serve(cfg, index))
    except OSError as exc:
        print(f"worker {index}: {exc}", file=sys.stderr)
        return 1
    return 0
