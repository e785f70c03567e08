"""`attention-service`: run the HTTP service with uvicorn; `attention-service ray`: the same app
as Ray Serve replicas (the `ray` extra).

Flags override the ATTN_ environment (ATTN_HOST, ATTN_PORT, ATTN_WORKERS, ATTN_LOG_LEVEL,
ATTN_ACCESS_LOG; ATTN_RAY_REPLICAS, ATTN_RAY_REPLICA_CPUS for `ray`);
every other setting comes from the environment only (see service.web.settings).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from typing import Any

import uvicorn
from pydantic import ValidationError

from service.web.settings import Settings


def _setting_flag(
    p: argparse.ArgumentParser, flag: str, defaults: Settings, setting: str, what: str, **kw: Any
) -> None:
    """A flag that overrides the setting `setting` (ATTN_<SETTING>): its default is the
    setting's value, and its help names both."""
    value = getattr(defaults, setting)
    help = f"{what}, default {value} (ATTN_{setting.upper()})"
    p.add_argument(flag, default=value, help=help, **kw)


def _command(
    prog: str, description: str, epilog: str, defaults: Settings
) -> argparse.ArgumentParser:
    """A command's parser with the flags both commands share: --host and --port."""
    p = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog)
    _setting_flag(p, "--host", defaults, "host", "address to listen on")
    _setting_flag(p, "--port", defaults, "port", "port to listen on", type=int)
    return p


def _parser(defaults: Settings) -> argparse.ArgumentParser:
    p = _command(
        "attention-service",
        "Attention as a service: exact fused attention over HTTP, with heatmaps.",
        "Other settings come from ATTN_* environment variables (see the README). "
        "`attention-service ray --help`: the same app on Ray Serve replicas.",
        defaults,
    )
    _setting_flag(p, "--workers", defaults, "workers", "worker processes", type=int)
    levels = ["critical", "error", "warning", "info", "debug", "trace"]
    _setting_flag(p, "--log-level", defaults, "log_level", "log level", choices=levels)
    _setting_flag(
        p,
        "--access-log",
        defaults,
        "access_log",
        "one log line per request",
        action=argparse.BooleanOptionalAction,
    )
    return p


def _ray_parser(defaults: Settings) -> argparse.ArgumentParser:
    p = _command(
        "attention-service ray",
        "Serve the same app as a Ray Serve deployment: on the Ray cluster that RAY_ADDRESS "
        "names, else on a local one started here (and stopped on exit).",
        "Autoscaling: give --min-replicas and/or --max-replicas (then --replicas is the "
        "initial count). Needs the `ray` extra: pip install 'attention-service[ray]'.",
        defaults,
    )
    _setting_flag(p, "--replicas", defaults, "ray_replicas", "replicas", type=int)
    p.add_argument("--min-replicas", type=int, help="autoscaling: fewest replicas")
    p.add_argument("--max-replicas", type=int, help="autoscaling: most replicas")
    p.add_argument(
        "--target-ongoing-requests",
        type=float,
        default=2.0,
        help="autoscaling: requests in flight per replica it aims at (default 2)",
    )
    _setting_flag(
        p,
        "--replica-cpus",
        defaults,
        "ray_replica_cpus",
        "CPUs Ray reserves per replica",
        type=float,
    )
    p.add_argument("--num-cpus", type=int, help="CPUs of the local cluster (default: all cores)")
    return p


def _ray_main(argv: Sequence[str], defaults: Settings) -> None:
    args = _ray_parser(defaults).parse_args(argv)
    for name, least in (("replicas", 1), ("min_replicas", 0), ("max_replicas", 1), ("num_cpus", 1)):
        value = getattr(args, name)
        if value is not None and value < least:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= {least}")
    low, high = args.min_replicas, args.max_replicas
    if low is not None and high is not None and low > high:
        raise SystemExit("--min-replicas must not exceed --max-replicas")
    if args.replica_cpus <= 0:
        raise SystemExit("--replica-cpus must be > 0")
    try:
        import ray.serve  # noqa: F401 - checked here, for a clear message

        from service.web.rayserve import ServeOptions, serve_forever
    except ImportError:
        raise SystemExit(
            "attention-service ray needs Ray Serve: pip install 'attention-service[ray]'"
        ) from None
    os.environ["ATTN_HOST"] = args.host
    os.environ["ATTN_PORT"] = str(args.port)
    # The flags' names are ServeOptions' fields.
    options = ServeOptions(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeOptions)}
    )
    serve_forever(options, defaults)


def main(argv: Sequence[str] | None = None) -> None:
    try:
        defaults = Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"ATTN_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors()
        )
        raise SystemExit(f"attention-service: invalid setting: {problems}") from None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["ray"]:
        _ray_main(argv[1:], defaults)
        return
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
