"""`attention-service`: run the HTTP service with uvicorn.

Flags override the ATTN_ environment (ATTN_HOST, ATTN_PORT, ATTN_WORKERS, ATTN_LOG_LEVEL,
ATTN_ACCESS_LOG);
every other setting comes from the environment only (see service.web.settings).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import uvicorn
from pydantic import ValidationError

from service.web.settings import Settings


def _parser(defaults: Settings) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="attention-service",
        description="Attention as a service: exact fused attention over HTTP, with heatmaps.",
        epilog="Other settings come from ATTN_* environment variables (see the README).",
    )
    p.add_argument("--host", default=defaults.host, help=f"default {defaults.host} (ATTN_HOST)")
    p.add_argument(
        "--port", type=int, default=defaults.port, help=f"default {defaults.port} (ATTN_PORT)"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=defaults.workers,
        help=f"worker processes, default {defaults.workers} (ATTN_WORKERS)",
    )
    p.add_argument(
        "--log-level",
        default=defaults.log_level,
        choices=["critical", "error", "warning", "info", "debug", "trace"],
        help=f"default {defaults.log_level} (ATTN_LOG_LEVEL)",
    )
    p.add_argument(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        default=defaults.access_log,
        help="one log line per request (ATTN_ACCESS_LOG)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> None:
    try:
        defaults = Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"ATTN_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors()
        )
        raise SystemExit(f"attention-service: invalid setting: {problems}") from None
    args = _parser(defaults).parse_args(argv)
    if args.workers < 1:
        raise SystemExit("--workers must be >= 1")
    # Worker processes build their app from the environment: pass the flags on through it.
    os.environ["ATTN_HOST"] = args.host
    os.environ["ATTN_PORT"] = str(args.port)
    os.environ["ATTN_WORKERS"] = str(args.workers)
    os.environ["ATTN_LOG_LEVEL"] = args.log_level
    os.environ["ATTN_ACCESS_LOG"] = str(args.access_log).lower()
    uvicorn.run(
        "service.web.app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
        access_log=args.access_log,
        # The app answers every error itself; uvicorn's defaults suit the rest.
        server_header=False,
    )


if __name__ == "__main__":
    main()
