"""The second process of ``xmllm build``: the case study beside the examples, then examples too.

The examples and the case study are independent model work of about half a minute each on a
2-CPU machine, and a small model gains little from a second torch thread. So a fresh build runs
the case study in a process of its own while the first process makes the examples, both on
:data:`MODEL_THREADS` thread. Once the study is done the second process takes examples from the
end of the list while the first goes on from the front; each explainer is claimed by creating a
file (``O_EXCL``), so exactly one process makes it, into the shared cache, and the first reads the
second's from there. The build takes about half the work instead of all of it.

The count of threads is part of what fixes the last digits of every number (float sums split
across threads add up in another order); a build uses the same count in both processes and
whether or not the other half was cached, so the same build gives the same digits every time.

The whole study is cached under one key (weights, pairs, seed, device, threads), besides each of
its model results, so a second build reads it back without starting a process.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xmllm.errors import XmllmError

from .cache import RunCache, cache_key
from .casestudy import CaseStudyConfig, run_case_study
from .files import scratch_dir

if TYPE_CHECKING:  # pragma: no cover
    from .session import ModelSession

CLAIMS_PREFIX = "claims-"
"""Scratch folders holding one build's claim files (and the second process's copies of reports)."""
MODEL_THREADS = 1
"""Torch threads of a build's model work, in each of its processes."""
STUDY_FILE = "study.json"
PAIR_LINE = "pair"
EXAMPLE_LINE = "example"
RESULT_LINE = "result"


def study_key(session: ModelSession, config: CaseStudyConfig) -> str:
    return cache_key(session.weights, "-", "casestudy.study",
                     {"pairs": config.pairs, "seed": config.seed, "device": session.device,
                      "threads": MODEL_THREADS, "model_seed": session.seed})


def cached_study(session: ModelSession, config: CaseStudyConfig, progress: bool = True,
                 on_pair: Any = None) -> dict[str, Any]:
    """The study from its whole-study entry, computed (and stored) when missing."""
    def build(folder: Path) -> None:
        study = run_case_study(session, config, progress, on_pair)
        (folder / STUDY_FILE).write_text(json.dumps(study, sort_keys=True), encoding="utf-8")

    folder = session.cache.get_or_build(study_key(session, config), build)
    return json.loads((folder / STUDY_FILE).read_text(encoding="utf-8"))


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@dataclass
class StudyRun:
    """The case study of one build: read whole from the cache, run beside the examples in a second
    process, or (one CPU, or nothing else to do) run here when :meth:`result` is asked for."""

    session: ModelSession
    config: CaseStudyConfig
    study: dict[str, Any] | None = None
    seconds: float | None = None
    """The study's own seconds where it ran in the second process."""
    cache_hits: int = 0
    cache_misses: int = 0
    model_loaded: bool = False
    examples: list[str] = field(default_factory=list)
    """Explainers whose examples the second process made (read them from the cache)."""
    _process: subprocess.Popen[str] | None = field(default=None, repr=False)
    _claims: Path | None = field(default=None, repr=False)

    @classmethod
    def start(cls, session: ModelSession, config: CaseStudyConfig, beside: bool,
              examples: list[str] | None = None, scratch: Path | None = None) -> StudyRun:
        """Begin: the whole study from the cache if it is there, else (``beside``: there is other
        work and a second CPU) a second process that computes it and then takes ``examples`` from
        the end (where the cache is on, claims kept under ``scratch``)."""
        run = cls(session, config)
        found = session.cache.get(study_key(session, config)) if session.cache.enabled else None
        if found is not None:
            session.cache.hits += 1
            run.study = json.loads((found / STUDY_FILE).read_text(encoding="utf-8"))
        elif beside and available_cpus() >= 2:
            share = bool(examples) and scratch is not None and session.cache.enabled
            if share:
                run._claims = scratch_dir(Path(scratch), CLAIMS_PREFIX)
            run._spawn(list(examples or []) if share else [])
        return run

    def claim(self, eid: str) -> bool:
        """Take explainer ``eid``'s example for this process; False where the other one has it."""
        return self._claims is None or _claim(self._claims, eid)

    @property
    def in_second_process(self) -> bool:
        return self._process is not None

    def _spawn(self, examples: list[str]) -> None:
        # a fresh interpreter (``python -m``), not multiprocessing: its spawn re-runs the caller's
        # main script, which breaks a script that calls build_site without a __main__ guard
        s = self.session
        job = {"spec": s.spec, "cache": str(s.cache.root), "use_cache": s.cache.enabled, "device": s.device,
               "seed": s.seed, "config": asdict(self.config),
               "examples": examples, "claims": str(self._claims) if self._claims else None}
        self._process = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True, encoding="utf-8")
        assert self._process.stdin is not None
        self._process.stdin.write(json.dumps(job))
        self._process.stdin.close()

    def result(self, progress: bool = True) -> dict[str, Any]:
        """The study; waits for the second process (showing its progress) or runs it here."""
        if self.study is not None:
            return self.study
        if self._process is None:
            self.study = cached_study(self.session, self.config, progress)
            return self.study
        return self._wait(progress)

    def _wait(self, progress: bool) -> dict[str, Any]:
        from tqdm import tqdm

        process = self._process
        assert process is not None and process.stdout is not None
        message: dict[str, Any] | None = None
        with tqdm(total=self.config.pairs, desc="case study", unit="pair", file=sys.stderr,
                  disable=not progress) as bar:
            for line in process.stdout:
                kind, _, body = line.rstrip("\n").partition(" ")
                if kind == PAIR_LINE:
                    bar.update(1)
                elif kind == EXAMPLE_LINE:
                    self.examples.append(body)
                elif kind == RESULT_LINE:
                    message = json.loads(body)
        code = process.wait()
        self.close()
        if message is None:  # the process died without a word (killed, out of memory)
            raise XmllmError(f"case study: its process ended with exit code {code} and no result")
        if "error" in message:
            if message["ours"]:
                raise XmllmError(message["error"])
            raise RuntimeError(f"case study process: {message['name']}: {message['error']}\n{message['trace']}")
        self.study, self.seconds = message["study"], message["seconds"]
        self.cache_hits, self.cache_misses, self.model_loaded = message["hits"], message["misses"], message["loaded"]
        return self.study

    def close(self) -> None:
        """Stop the second process if it still runs (the build failed or was interrupted)."""
        process = self._process
        if process is not None and process.poll() is None:
            try:
                process.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                process.terminate()
                process.wait()
        if process is not None and process.stdout is not None:
            process.stdout.close()
        if self._claims is not None:
            shutil.rmtree(self._claims, ignore_errors=True)
            self._claims = None


def _claim(folder: Path, eid: str) -> bool:
    try:
        os.close(os.open(folder / eid, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _child() -> int:
    """The second process: the job from stdin, its own session on the same cache, one thread; a line
    per pair and the result (or the error) as one JSON line on stdout, everything else to stderr."""
    from .session import ModelSession

    out, sys.stdout = sys.stdout, sys.stderr  # a library's print must not break the protocol

    def say(kind: str, body: str = "") -> None:
        out.write(f"{kind} {body}\n")
        out.flush()

    t0 = time.perf_counter()
    try:
        job = json.loads(sys.stdin.read())
        session = ModelSession(job["spec"], RunCache(Path(job["cache"]), enabled=job["use_cache"]),
                               device=job["device"], seed=job["seed"], threads=MODEL_THREADS)
        study = cached_study(session, CaseStudyConfig(**job["config"]), progress=False,
                             on_pair=lambda: say(PAIR_LINE))
        if job["claims"]:
            from .example_reports import build_examples

            claims = Path(job["claims"])
            for eid in reversed(job["examples"]):  # from the end, until the first process's claims
                if not _claim(claims, eid):
                    break
                build_examples(session, [eid], claims / "reports", False, {}, {})
                say(EXAMPLE_LINE, eid)
        say(RESULT_LINE, json.dumps({"study": study, "seconds": time.perf_counter() - t0, "hits": session.cache.hits,
                                     "misses": session.cache.misses, "loaded": session.loaded_now}))
        return 0
    except BaseException as exc:  # everything goes back to the build, which raises it there
        say(RESULT_LINE, json.dumps({"error": str(exc), "name": type(exc).__name__,
                                     "ours": isinstance(exc, XmllmError), "trace": traceback.format_exc()}))
        return 1


if __name__ == "__main__":
    sys.exit(_child())
