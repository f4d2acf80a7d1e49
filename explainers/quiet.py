"""Other libraries' logging and progress bars, routed through xmllm's own output.

transformers talks on its own: a "Loading weights" bar per model load, a deprecation notice about
``past_key_values`` on the first forward, and a "Token indices sequence length is longer than the
specified maximum" line before xmllm's own one-line refusal of a too-long question. A user of
``xmllm`` or of a notebook should see xmllm's progress bars and messages only, so
:func:`route_library_output` (called by :func:`xmllm.explainers.models.load_model` and by the
command line) does this:

- messages known to be harmless (:data:`KNOWN_HARMLESS`) are dropped;
- any other warning of transformers or huggingface_hub is shown once, as one line of ours:
  ``xmllm: transformers: <its first line>``;
- transformers' own progress bars (loading weights) are off; huggingface_hub's download bars stay,
  since a download can take minutes and is not something we report ourselves;
- with ``--verbose`` (or ``XMLLM_VERBOSE=1`` in the environment, which ``--verbose`` sets so that
  worker processes follow it, and which a notebook can set) nothing is routed: the libraries print
  what they would print without xmllm.

transformers is configured through its public switches (``transformers.utils.logging``: its
default handler, ``disable_progress_bar``); huggingface_hub has no switch for its stderr handler,
which is set aside while routed and put back under ``--verbose``. Neither library is imported
here, only configured once something else has imported it.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import threading
import warnings

VERBOSE_ENV = "XMLLM_VERBOSE"
"""Set to 1 for everything other libraries print (what ``xmllm --verbose`` sets)."""
PREFIX = "xmllm: "
"""Every line xmllm writes to stderr itself starts with this (besides its progress bars)."""
LIBRARIES = ("transformers", "huggingface_hub")
"""Loggers whose records are routed."""
KNOWN_HARMLESS: tuple[re.Pattern[str], ...] = (
    # transformers 5 renamed the cache argument; our forwards pass neither name, its own code does
    re.compile(r"`past_key_values`/`cache_params` are deprecated"),
    # the tokenizer's own length notice; xmllm checks the prompt against the model's context itself
    # and refuses a too-long question in one line of its own before any forward
    re.compile(r"^Token indices sequence length is longer than the specified maximum sequence length"),
    # hybrid decoders (Qwen3.5's linear attention) without the optional CUDA kernels: the reference
    # PyTorch path is exact, only slower, and on a CPU there is no other
    re.compile(r"is falling back to its reference PyTorch implementation"),
    # a family's config built without RoPE settings (its vision or audio part, or xmllm models
    # reading every config class): transformers' defaults apply, as they do for the checkpoint
    re.compile(r"`standardize_rope_params` was called but no RoPE parameters were found"),
)
_TRUTHY = {"1", "true", "yes", "on"}
_lock = threading.Lock()
_verbose_override: bool | None = None


def is_verbose() -> bool:
    """Whether third-party output is shown unrouted: :func:`set_verbose`, else ``$XMLLM_VERBOSE``."""
    if _verbose_override is not None:
        return _verbose_override
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in _TRUTHY


def set_verbose(verbose: bool, *, export: bool = False) -> None:
    """Show (True) or route (False) other libraries' output from now on; ``export`` also sets
    ``$XMLLM_VERBOSE`` so that processes started from here do the same."""
    global _verbose_override
    _verbose_override = bool(verbose)
    if export:
        if verbose:
            os.environ[VERBOSE_ENV] = "1"
        else:
            os.environ.pop(VERBOSE_ENV, None)
    route_library_output()


def is_harmless(message: str) -> bool:
    return any(pattern.search(message) for pattern in KNOWN_HARMLESS)


class _Routed(logging.Handler):
    """Drops known-harmless records; writes any other one once, as a line of ours."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen: set[tuple[str, str]] = set()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a library's malformed record must not break our output
            message = str(record.msg)
        if is_harmless(message):
            return
        library = record.name.split(".", 1)[0]
        lines = [line for line in message.strip().splitlines() if line.strip()] or [""]
        key = (library, lines[0])
        with _lock:
            if key in self.seen:
                return
            self.seen.add(key)
        more = " (xmllm --verbose shows the rest)" if len(lines) > 1 else ""
        stream = sys.stderr
        if stream is not None:
            stream.write(f"{PREFIX}{library}: {lines[0]}{more}\n")
            stream.flush()


_HANDLER = _Routed()


def _route_warnings(verbose: bool) -> None:
    """Python warnings carrying a known-harmless message (older transformers warn instead of log)."""
    for pattern in KNOWN_HARMLESS:
        text = pattern.pattern.lstrip("^")  # a warnings filter matches at the message's start anyway

        def ours(f: tuple) -> bool:
            return f[0] == "ignore" and getattr(f[1], "pattern", None) == text

        if verbose:
            warnings.filters[:] = [f for f in warnings.filters if not ours(f)]
        elif not any(ours(f) for f in warnings.filters):
            warnings.filterwarnings("ignore", message=text)


def _route_transformers(verbose: bool) -> None:
    from transformers.utils import logging as hf_logging

    root = hf_logging.get_logger()  # configures transformers' root logger (its default handler) if not yet
    if verbose:
        root.removeHandler(_HANDLER)
        hf_logging.enable_default_handler()
        hf_logging.enable_progress_bar()
        return
    hf_logging.disable_default_handler()
    if _HANDLER not in root.handlers:
        root.addHandler(_HANDLER)
    try:
        from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    except ImportError:  # pragma: no cover - an old hub without the switch
        hf_logging.disable_progress_bar()
        return
    hub_bars_were_off = are_progress_bars_disabled()
    hf_logging.disable_progress_bar()  # transformers' own bars ("Loading weights"); it also turns the hub's off
    if not hub_bars_were_off:
        enable_progress_bars()  # downloads keep their bars


_hub_handlers: list[logging.Handler] = []
"""huggingface_hub's own handlers (a plain stderr one), set aside while routed."""


def _route_hub(verbose: bool) -> None:
    hub = logging.getLogger("huggingface_hub")
    if verbose:
        if _HANDLER in hub.handlers:
            hub.removeHandler(_HANDLER)
            for handler in _hub_handlers:
                hub.addHandler(handler)
            _hub_handlers.clear()
            hub.propagate = True
    elif _HANDLER not in hub.handlers:
        _hub_handlers[:] = [h for h in hub.handlers if h is not _HANDLER]
        for handler in _hub_handlers:  # the hub has no switch for its default handler: set it aside
            hub.removeHandler(handler)
        hub.addHandler(_HANDLER)
        hub.propagate = False  # no second copy through the root logger's handlers


def route_library_output(verbose: bool | None = None) -> None:
    """Route (or, when verbose, stop routing) the output of the libraries already imported.

    Cheap and idempotent: called on every model load, so transformers is configured whether it was
    imported by xmllm or by the user's own code before."""
    if verbose is None:
        verbose = is_verbose()
    _route_warnings(verbose)
    if "transformers" in sys.modules:
        _route_transformers(verbose)
    if "huggingface_hub" in sys.modules:
        _route_hub(verbose)
