"""``xmllm serve``: serve a built site on 127.0.0.1 (search and reports work from file:// too)."""
from __future__ import annotations

import argparse
import errno
import functools
from pathlib import Path

from ..explainers.errors import XmllmError

HOST = "127.0.0.1"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the built site locally (127.0.0.1)")
    p.add_argument("--dir", type=Path, default=Path("public"), help="the built site (default public/)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--build", action="store_true", help="run 'xmllm build --out DIR' first (default options)")
    p.set_defaults(func=run)


def make_server(folder: Path, port: int):
    """A threading HTTP server for ``folder`` bound to 127.0.0.1; one-line errors for the usual faults."""
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    if not (folder / "index.html").is_file():
        raise XmllmError(f"--dir {folder}: no index.html there; build the site first with 'xmllm build --out {folder}'")
    if not 0 <= port <= 65535:
        raise XmllmError(f"--port {port}: must be between 0 and 65535")

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args) -> None:  # quiet: one line per request is noise here
            pass

    handler = functools.partial(Handler, directory=str(folder))
    try:
        return ThreadingHTTPServer((HOST, port), handler)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise XmllmError(f"--port {port}: already in use; pick another with --port") from None
        raise XmllmError(f"cannot serve on {HOST}:{port}: {exc.strerror or exc}") from None


def run(args: argparse.Namespace) -> int:
    if args.build:
        from ..build import BuildOptions, build_site

        summary = build_site(BuildOptions(out=args.dir))
        print(f"built {summary.out} in {summary.seconds:.1f}s")
    server = make_server(args.dir, args.port)
    host, port = server.server_address[:2]
    print(f"serving {args.dir} at http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped")
    finally:
        server.server_close()
    return 0
