"""``python -m backends``: run one backend simulator.

    python -m backends --kind vllm --host 127.0.0.1 --port 8101 --model NAME [knobs...]

Once listening it prints exactly one line to stdout, ``simulator ready kind=vllm
port=8101`` (with the real port when ``--port 0`` asked for a free one), so a supervisor
can wait for it. SIGTERM / SIGINT stop it cleanly.

Personalities are sibling modules listed in :data:`PERSONALITIES`: ``vllm``
(``backends/vllm.py``), ``tgi`` (``tgi.py``), ``tei`` (``tei.py``) and ``openai``
(``openai_media.py``). Each provides ``add_arguments(parser)`` for its flags and
``app_from_args(args) -> backends.http.App``; all of them accept the flags ``tollgate up``
passes for a ``simulate:`` block (``--model``, ``--ttft-ms``, ``--itl-ms``,
``--output-tokens``, ``--max-running``, ``--max-queue``; see ``backends/common.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import signal
import sys
from types import ModuleType

from backends.http import App, bound_port, start_server

PERSONALITIES: dict[str, str] = {
    "vllm": "backends.vllm",
    "tgi": "backends.tgi",
    "tei": "backends.tei",
    "openai": "backends.openai_media",
}


def _personality(kind: str) -> ModuleType:
    return importlib.import_module(PERSONALITIES[kind])


def build_parser(kind: str | None = None, *, add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m backends",
        description="Run an inference-backend simulator.",
        add_help=add_help,
    )
    parser.add_argument("--kind", choices=sorted(PERSONALITIES), default="vllm")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument(
        "--keep-alive-timeout",
        type=float,
        default=5.0,
        help="close idle keep-alive connections after this many seconds "
        "(uvicorn/vLLM default 5; 0 = never)",
    )
    parser.add_argument("--log-level", default="warning")
    if kind is not None:
        _personality(kind).add_arguments(parser)
    return parser


async def serve(app: App, host: str, port: int, kind: str) -> None:
    """Serve ``app`` until SIGTERM/SIGINT; print the ready line once listening."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server = await start_server(app, host, port)
    print(f"simulator ready kind={kind} port={bound_port(server)}", flush=True)
    try:
        await stop.wait()
    finally:
        server.close()
        app.close_connections()
        with contextlib.suppress(Exception, asyncio.TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 2.0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    first, _ = build_parser(add_help=False).parse_known_args(argv)
    args = build_parser(first.kind).parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = _personality(args.kind).app_from_args(args)
    try:
        import uvloop

        uvloop.run(serve(app, args.host, args.port, args.kind))
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        pass
    except OSError as exc:  # e.g. address in use
        print(f"simulator failed: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
