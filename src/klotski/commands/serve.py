"""`klotski serve`: an OpenAI-compatible HTTP server whose concurrent requests share batch groups."""

from __future__ import annotations

import signal
import sys

from klotski.commands.generate import add_config_flags, add_engine_flags, engine_kwargs
from klotski.errors import KlotskiError


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve the OpenAI API (/v1/completions, /v1/chat/completions) over HTTP")
    p.add_argument("--model", help="checkpoint directory (default: the built-in Shakespeare-trained Mixtral)")
    add_config_flags(p, "dtype", "context")
    add_engine_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", help="the model name clients send (default: --model as given)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 endpoints")
    p.add_argument(
        "--max-queue",
        type=int,
        default=1024,
        help="sequences that may wait to join the running group; more get 429 (default 1024)",
    )
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=50.0,
        help="how long the first requests of an idle server wait for company (default 50)",
    )
    p.add_argument(
        "--max-num-seqs",
        type=int,
        default=256,
        help="the group is planned (bs x n) as for this many sequences (default 256)",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM, seconds running requests get to finish before they are cancelled",
    )
    p.add_argument("--log-level", default="warning", help="uvicorn's log level (default warning)")
    p.set_defaults(handler=run)


def _check(args) -> None:
    if args.trace or args.timeline:
        raise KlotskiError("--trace and --timeline record one run; a server has no end: use /metrics")
    if not 0 <= args.port <= 65535:
        raise KlotskiError(f"--port {args.port} is not a TCP port (0..65535)")
    for flag, value in (("--max-queue", args.max_queue), ("--max-num-seqs", args.max_num_seqs)):
        if value < 1:
            raise KlotskiError(f"{flag} {value} must be at least 1")
    if args.max_wait_ms < 0 or args.shutdown_timeout < 0:
        raise KlotskiError("--max-wait-ms and --shutdown-timeout cannot be negative")
    if args.max_model_len is not None and args.max_model_len < 2:
        raise KlotskiError(f"--max-model-len {args.max_model_len} must be at least 2")


def run(args) -> int:
    import uvicorn

    from klotski.entrypoints.server import EngineState, ServerConfig, create_app

    _check(args)
    if args.model is None:
        from klotski.default_model import NOTICE

        print(NOTICE, file=sys.stderr)

    def load():
        from klotski.engine import LLM

        return LLM(
            model=args.model,
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            record_timeline=False,
            **engine_kwargs(args),
        )

    config = ServerConfig(
        served_model_name=args.served_model_name or args.model or "default",
        api_key=args.api_key,
        max_queue=args.max_queue,
        max_wait_ms=args.max_wait_ms,
        max_num_seqs=args.max_num_seqs,
        shutdown_timeout=args.shutdown_timeout,
    )
    state = EngineState(load, config)
    app = create_app(state)
    server = _make_server(
        uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            timeout_graceful_shutdown=args.shutdown_timeout,
        ),
        state,
    )

    def load_failed(message: str) -> None:
        server.should_exit = True

    state.on_load_error = load_failed
    # uvicorn re-raises the signal it shut down on once it is done; by then the shutdown is complete
    # and clean, so the process ends with 0 instead of dying of the re-raised SIGTERM.
    signal.signal(signal.SIGTERM, lambda sig, frame: None)
    print(
        f"klotski: serving {config.served_model_name!r} on http://{args.host}:{args.port}/v1 "
        "(loading the model; /health answers 200 once ready)",
        file=sys.stderr,
        flush=True,
    )
    server.run()
    if state.error is not None:
        raise KlotskiError(state.error)
    return 0


def _make_server(config, state):
    """uvicorn's server, telling the engine to stop admitting as soon as a signal arrives."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            state.begin_shutdown()
            super().handle_exit(sig, frame)

    return Server(config)
