"""The ``xmllm`` entry point: builds the parser from the discovered subcommands."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import pkgutil
import signal
import sys
import threading
from importlib.metadata import PackageNotFoundError, version
from typing import Sequence

from . import commands
from xmllm.errors import XmllmError

USER_ERROR = 2
"""Exit status of every user error (a bad file, field or value): the CLI's one mapping of :class:`XmllmError`."""
INTERRUPTED = 130
"""Exit status after Ctrl-C (SIGINT): 128 + 2, as shells report it."""
TERMINATED = 143
"""Exit status after SIGTERM (``kill``, a scheduler's timeout): 128 + 15. Either way the command
stops as after Ctrl-C: ``xmllm: interrupted``, scratch folders removed, nothing half-written, and an
audit resumes where it stopped when rerun."""
BROKEN_PIPE = 141
"""Exit status when the reader of the output goes away (``| head``): 128 + 13 (SIGPIPE), as ``cat``
reports it, without a traceback."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that it unwinds (and cleans up) as after Ctrl-C."""


VERBOSE_HELP = ("show everything other libraries print (transformers' notices and loading bars), "
                "which xmllm otherwise routes: known-harmless ones dropped, others shown once")


def _on_sigterm(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the cleanup
    raise Terminated()


def package_version() -> str:
    """The installed distribution's version (falls back for a bare checkout)."""
    try:
        return version("xmllm")
    except PackageNotFoundError:  # running from a checkout that was never installed
        return "0+unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xmllm",
        description="Explain multimodal LLMs: catalog, explainers, reports, site.",
    )
    parser.add_argument("--version", action="version", version=f"xmllm {package_version()}")
    parser.add_argument("--verbose", action="store_true", default=False, help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        module.add_parser(sub)
    for command in sub.choices.values():  # also after the command: 'xmllm build --verbose'
        if not any("--verbose" in action.option_strings for action in command._actions):
            command.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    if args.verbose:
        from xmllm.explainers.quiet import set_verbose

        set_verbose(True, export=True)  # exported: worker processes (the build's case study, audits) follow
    from xmllm.allocator import keep_freed_memory

    keep_freed_memory()  # batched CPU forwards reuse freed blocks instead of page-faulting fresh ones
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return int(args.func(args) or 0)
    except XmllmError as exc:
        print(f"xmllm: error: {exc}", file=sys.stderr)
        return USER_ERROR
    except KeyboardInterrupt as exc:
        print("xmllm: interrupted", file=sys.stderr)
        return TERMINATED if isinstance(exc, Terminated) else INTERRUPTED
    except BrokenPipeError:  # the reader went away ('xmllm models --json | head'): stop quietly, as cat does
        with contextlib.suppress(OSError):  # Python's flush at exit would raise again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return BROKEN_PIPE
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
