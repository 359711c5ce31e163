"""The `nmt` command line: prepare, train, plot, translate, evaluate, score, export, serve."""

from __future__ import annotations

import argparse
import logging
import sys

from nmt import __version__
from nmt.errors import NMTError


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    from nmt import corpus

    corpus.add_cli(sub)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model from a YAML config")
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("--resume", action="store_true", help="continue the run in train.run_dir exactly")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=0.0005 (repeatable)")
    p.set_defaults(func=_run_train)

    p = sub.add_parser("plot", help="write a PNG of a run's training curves")
    p.add_argument("run", help="run directory (holds metrics.jsonl)")
    p.add_argument("-o", "--output", help="PNG path (default RUN/curves.png)")
    p.set_defaults(func=_run_plot)


def _run_train(args: argparse.Namespace) -> int:
    from nmt.config import load_config
    from nmt.train import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg, resume=args.resume)
    best = f"{result['best_bleu']:.2f}" if result["best_bleu"] >= 0 else "n/a"
    print(f"run: {cfg.train.run_dir}  steps: {result['step']}  best dev BLEU: {best}  stopped: {result['reason']}")
    return 0


def _run_plot(args: argparse.Namespace) -> int:
    from nmt.plot import plot_run

    out = plot_run(args.run, args.output)
    print(out)
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over HTTP (API, metrics, web page); settings from NMT_* variables")
    p.add_argument("model", nargs="?", help="model or run directory (default: $NMT_MODEL_DIR, else models/es-en-bible)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--workers", type=int, default=1, help="worker processes, each with its own model copy (default 1)")
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from service.server import serve

    serve(args.model, args.host, args.port, args.workers)
    return 0


COMMANDS = [_add_prepare, _add_train, _add_serve]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nmt", description="RNNsearch neural machine translation")
    parser.add_argument("--version", action="version", version=f"rnnsearch {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except NMTError as exc:
        print(f"nmt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nmt {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
