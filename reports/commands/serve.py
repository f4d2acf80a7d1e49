"""``xmllm serve``: serve a built site on 127.0.0.1 (search and reports work from file:// too)."""
from __future__ import annotations

import argparse
import errno
import functools
import stat
from http import HTTPStatus
from pathlib import Path

from xmllm.errors import XmllmError

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

    root = folder.resolve()

    class Handler(SimpleHTTPRequestHandler):
        """Regular files inside the folder only: no directory listings, no symlink that leads out
        of it, no device or socket; everything else answers 404."""

        def send_head(self):
            path = Path(self.translate_path(self.path))
            if path.is_dir():
                if not self.path.split("?", 1)[0].split("#", 1)[0].endswith("/"):
                    return super().send_head()  # the redirect to the slashed URL
                path = path / "index.html"
            if not _servable(path, root):
                self.send_error(HTTPStatus.NOT_FOUND, "File not found")
                return None
            return super().send_head()

        def list_directory(self, path):  # never reached for a folder without index.html; refuse anyway
            self.send_error(HTTPStatus.NOT_FOUND, "File not found")
            return None

        def log_message(self, format: str, *args) -> None:  # quiet: one line per request is noise here
            pass

    handler = functools.partial(Handler, directory=str(root))
    try:
        return ThreadingHTTPServer((HOST, port), handler)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise XmllmError(f"--port {port}: already in use; pick another with --port") from None
        raise XmllmError(f"cannot serve on {HOST}:{port}: {exc.strerror or exc}") from None


def _servable(path: Path, root: Path) -> bool:
    """``path``, with every link resolved, is a regular file inside ``root``."""
    try:
        real = path.resolve(strict=True)
        return real.is_relative_to(root) and stat.S_ISREG(real.stat().st_mode)
    except (OSError, RuntimeError):  # missing, a link loop, unreadable
        return False


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
