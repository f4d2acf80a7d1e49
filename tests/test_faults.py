"""Bad input and faults: each case ends in one ``xmllm: error:`` line (exit 2) or a clean
interruption, and leaves nothing behind that a rerun does not remove.

Everything runs for real: the command line (``xmllm.cli.main`` or a subprocess), tiny sample sets,
the random demo model. Read-only folders are real (``chmod``, or for root, who ignores modes, a
read-only bind mount in a private mount namespace made by ``unshare``); a full disk is a real tiny
tmpfs in such a namespace where the machine allows it, and otherwise ``os.replace`` failing with
ENOSPC, the one simulated fault.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from audit_sets import write_config, write_set

from xmllm.audit import load_config, run_audit
from xmllm.cli import main

ROOT = Path(__file__).resolve().parents[1]
FAST_S = 5.0
"""A refused YAML bomb answers well within this (the bomb would take minutes and gigabytes)."""
STARTUP_LIMIT_S = 300


# --- helpers -------------------------------------------------------------------------------------------


def the_error(err: str, only: bool = True) -> str:
    """The one ``xmllm: error:`` line of stderr (``only``: and nothing else was printed)."""
    assert "Traceback" not in err, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("xmllm:")]
    assert len(lines) == 1 and lines[0].startswith("xmllm: error: "), err[-2000:]
    if only:
        assert err.strip() == lines[0], err[-2000:]
    return lines[0]


def cli(args: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main(args)
    return code, capsys.readouterr().err


def small_audit(root: Path, model: Path, n: int = 2, **extra) -> Path:
    """A config over ``n`` demo samples (the cheapest explainer set), output ``root/out``."""
    write_set(root / "set", n)
    options = {"explainers": {"perturbation.occlusion": {"window": 4}}, "checks": [], "faithfulness": {"enabled": False},
               **extra}
    return write_config(root / "audit.yaml", model, **options)


def debris(out: Path) -> list[str]:
    """What an audit folder may hold only while a process is writing it."""
    found = [p.name for p in out.glob(".site-*")] + [p.name for p in out.glob(".*.tmp")]
    if (out / "samples").is_dir():
        found += [p.name for p in (out / "samples").iterdir() if p.name.startswith(".")]
    return found


def xmllm_scratch(*folders: Path) -> list[Path]:
    """Scratch folders of xmllm under ``folders`` (TMPDIR, the cache's scratch folder)."""
    return [p for folder in folders if folder.is_dir() for p in folder.rglob("*")
            if p.is_dir() and ("xmllm" in p.name or p.name.startswith("audit-"))]


def tree(folder: Path) -> dict[str, bytes | None]:
    return {p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def subprocess_env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "tmpdir").mkdir(exist_ok=True)
    return {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path / "tmpdir"),
            "XMLLM_CACHE_DIR": str(tmp_path / "cache")}


def can_unshare() -> bool:
    """A private user and mount namespace can be made here (and mounts work inside it)."""
    if not shutil.which("unshare"):
        return False
    try:
        done = subprocess.run(["unshare", "-Urm", "sh", "-c", "mount -t tmpfs -o size=16k tmpfs /mnt 2>/dev/null "
                               "|| mount -t tmpfs -o size=16k tmpfs /tmp"], capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


@contextmanager
def read_only(folder: Path):
    """A command prefix under which ``folder`` (and all below it) cannot be written.

    Not root: the modes (``chmod -R a-w``), restored afterwards. Root ignores modes, so there the
    folder is bind-mounted read-only in a private mount namespace: the kernel answers EROFS."""
    if os.geteuid() != 0:
        modes = {p: stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.rglob("*")]}
        for p, mode in modes.items():
            os.chmod(p, mode & ~0o222)
        try:
            yield []
        finally:
            for p, mode in modes.items():
                os.chmod(p, mode)
    elif can_unshare():
        yield ["unshare", "-Urm", "sh", "-c", 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift '
               '&& exec "$@"', "sh", str(folder)]
    else:
        pytest.skip("running as root, where chmod does not stop writes, and unshare cannot make a read-only "
                    "mount here: no way to make a real read-only folder")


def run_xmllm(prefix: list[str], args: list[str], env: dict[str, str], timeout: float = STARTUP_LIMIT_S):
    return subprocess.run([*prefix, sys.executable, "-m", "xmllm.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def lol_chain(indent: str, levels: int = 9) -> str:
    """YAML 'billion laughs': each level a list of ten aliases of the one before (10^9 strings)."""
    lines = [f"{indent}- &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for k in range(1, levels):
        lines.append(f"{indent}- &l{k} [" + ", ".join([f"*l{k - 1}"] * 10) + "]")
    return "\n".join(lines) + "\n"


# --- 1. YAML bombs, huge files, duplicate keys --------------------------------------------------------


def test_billion_laughs_catalog_is_refused_at_once(tmp_path, capsys):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("survey:\n  title: x\nterms:\n" + lol_chain("  "), encoding="utf-8")
    t0 = time.perf_counter()
    code, err = cli(["catalog", "--check", str(bomb)], capsys)
    assert time.perf_counter() - t0 < FAST_S
    line = the_error(err)
    assert code == 2 and str(bomb) in line and "expands to more than" in line


def test_oversize_catalog_is_refused_unread(tmp_path, capsys):
    from xmllm.safe_yaml import MAX_BYTES

    big = tmp_path / "big.yaml"
    with big.open("w", encoding="utf-8") as handle:
        handle.write("# padding\n" * (MAX_BYTES // 10 + 1))
    code, err = cli(["catalog", "--check", str(big)], capsys)
    line = the_error(err)
    assert code == 2 and str(big) in line and "byte limit" in line


def test_bomb_in_an_audit_configs_explainer_parameters(tmp_path, capsys):
    cfg = tmp_path / "audit.yaml"
    cfg.write_text("samples: {type: jsonl, path: set/samples.jsonl}\nmodel: nowhere\noutput: out\nexplainers:\n"
                   "  perturbation.occlusion:\n    window:\n" + lol_chain("      "), encoding="utf-8")
    t0 = time.perf_counter()
    code, err = cli(["run", str(cfg), "--no-progress"], capsys)
    assert time.perf_counter() - t0 < FAST_S
    line = the_error(err)
    assert code == 2 and str(cfg) in line and "expands to more than" in line
    assert not (tmp_path / "out").exists()


# --- 2. sample sets that are not UTF-8 ----------------------------------------------------------------


def test_latin1_sample_set_is_one_line_naming_file_and_line(tmp_path, capsys, model):
    cfg = small_audit(tmp_path, model)
    samples = tmp_path / "set" / "samples.jsonl"
    lines = samples.read_text(encoding="utf-8").splitlines()
    bad = json.loads(lines[1])
    bad["question"] = "Is the café sign red?"
    samples.write_bytes((lines[0] + "\n" + json.dumps(bad, ensure_ascii=False) + "\n").encode("latin-1"))
    code, err = cli(["run", str(cfg), "--no-progress"], capsys)
    line = the_error(err)
    assert code == 2 and f"{samples}:2: not UTF-8 text (byte 0xe9" in line
    assert not (tmp_path / "out").exists()
    code, err = cli(["ask", "--model", str(model), "--samples", str(samples), "--device", "cpu"], capsys)
    assert code == 2 and f"{samples}:2: not UTF-8" in the_error(err)


def test_latin1_image_folder_csv_is_one_line_naming_its_line(tmp_path, capsys, model):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "q.csv").write_bytes("image,question\na.png,what colour\nb.png,où est le carré\n".encode("latin-1"))
    cfg = small_audit(tmp_path, model, samples={"type": "image_folder", "folder": "imgs", "csv": "q.csv"})
    code, err = cli(["run", str(cfg), "--no-progress"], capsys)
    assert code == 2 and f"{tmp_path / 'q.csv'}:3: not UTF-8" in the_error(err)


# --- 3, 4, 5. refused before any model work, and nothing written ---------------------------------------


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA: device: cuda is valid")
def test_cuda_device_without_cuda_names_the_field(tmp_path, capsys, model):
    cfg = small_audit(tmp_path, model, device="cuda")
    code, err = cli(["run", str(cfg), "--no-progress"], capsys)
    line = the_error(err)
    assert code == 2 and str(cfg) in line and "field device" in line and "'cuda'" in line
    assert not (tmp_path / "out").exists()


def test_unknown_explainer_parameter_stops_before_the_model(tmp_path, capsys):
    cfg = small_audit(tmp_path, tmp_path / "no-model-here", explainers={"perturbation.occlusion": {"windw": 2}})
    code, err = cli(["run", str(cfg), "--no-progress"], capsys)
    line = the_error(err)
    assert code == 2 and str(cfg) in line and "unknown parameter 'windw'" in line
    assert not (tmp_path / "out").exists()


def test_a_model_that_cannot_load_leaves_no_output(tmp_path, capsys):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json", encoding="utf-8")
    cfg = small_audit(tmp_path, broken)
    code, err = cli(["run", str(cfg), "--no-progress"], capsys)
    line = the_error(err, only=False)
    assert code == 2 and str(broken) in line
    assert not (tmp_path / "out").exists()


# --- 6. read-only output, a path under a file, a full disk ---------------------------------------------


def test_output_under_a_file_is_one_line(tmp_path, capsys, model):
    cfg = small_audit(tmp_path, model)
    (tmp_path / "afile").write_text("x")
    code, err = cli(["run", str(cfg), "--no-progress", "--out", str(tmp_path / "afile" / "out")], capsys)
    line = the_error(err)
    assert code == 2 and str(tmp_path / "afile") in line and "not a folder" in line


def test_read_only_output_new_run_and_rerun(tmp_path, model):
    cfg = small_audit(tmp_path, model)
    env = subprocess_env(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    with read_only(locked) as prefix:
        done = run_xmllm(prefix, ["run", str(cfg), "--no-progress", "--out", str(locked / "out")], env)
    line = the_error(done.stderr)
    assert done.returncode == 2 and str(locked / "out") in line and "cannot write" in line
    assert list(locked.iterdir()) == []

    assert main(["run", str(cfg), "--no-progress"]) == 0  # a finished audit, then rerun read-only
    out = tmp_path / "out"
    before = tree(out)
    with read_only(out) as prefix:
        done = run_xmllm(prefix, ["run", str(cfg), "--no-progress"], env)
    line = the_error(done.stderr)
    assert done.returncode == 2 and str(out) in line and "cannot write" in line
    assert tree(out) == before
    assert not xmllm_scratch(tmp_path / "tmpdir", tmp_path / "cache")


def test_full_disk_simulated(tmp_path, capsys, monkeypatch, model):
    """``os.replace`` into the output fails with ENOSPC: the rerun of a finished audit keeps every
    file as it was, a new run leaves no folder, and no temporary file stays behind."""
    cfg = small_audit(tmp_path, model)
    assert main(["run", str(cfg), "--no-progress"]) == 0
    out, new = tmp_path / "out", tmp_path / "new"
    before = tree(out)
    real_replace = os.replace

    def full(src, dst, *args, **kwargs):
        if str(dst).startswith((str(out), str(new))):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", full)
    code, err = cli(["run", str(cfg), "--no-progress"], capsys)
    line = the_error(err)
    assert code == 2 and str(out / "audit.json") in line and os.strerror(errno.ENOSPC) in line
    assert tree(out) == before and not debris(out)
    code, err = cli(["run", str(cfg), "--no-progress", "--out", str(new)], capsys)
    line = the_error(err, only=False)  # the model loaded (its progress bar may show) before the first write
    assert code == 2 and str(new) in line and os.strerror(errno.ENOSPC) in line
    assert not new.exists()


FULL_DISK_SCRIPT = '''
import contextlib, io, json, os, sys
from pathlib import Path
from xmllm.cli import main

disk, cfg = Path(sys.argv[1]), sys.argv[2]
out, new = disk / "out", disk / "new"

def run(*args):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["run", cfg, "--no-progress", *args])
    return code, err.getvalue()

def tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes().hex() if p.is_file() else None for p in sorted(folder.rglob("*"))}

first = run("--out", str(out))
before = tree(out)
fill = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)  # the disk, full
try:
    while os.write(fill, b"\\0" * 4096):
        pass
except OSError:
    pass
os.close(fill)
rerun = run("--out", str(out))
fresh = run("--out", str(new))
os.environ["XMLLM_CACHE_DIR"] = str(disk / "cache")  # the samples' scratch folders on the full disk too
scratch = run("--out", str(new))
print(json.dumps({"first": first, "rerun": rerun, "fresh": fresh, "scratch": scratch, "same": tree(out) == before,
                  "hidden": [p for p in tree(out) if any(part.startswith(".") and part != ".xmllm-audit"
                                                         for part in Path(p).parts)],
                  "new_exists": new.exists(), "left_in_cache": list(tree(disk / "cache"))}))
'''


@pytest.mark.skipif(not can_unshare(), reason="needs unshare with a private mount namespace to mount a tiny tmpfs "
                                              "(the simulated full disk above runs everywhere)")
def test_full_disk_on_a_real_tiny_tmpfs(tmp_path, model):
    cfg = small_audit(tmp_path, model)
    disk = tmp_path / "disk"
    disk.mkdir()
    script = tmp_path / "full_disk.py"
    script.write_text(FULL_DISK_SCRIPT, encoding="utf-8")
    prefix = ["unshare", "-Urm", "sh", "-c", 'mount -t tmpfs -o size=8m tmpfs "$1" && shift && exec "$@"', "sh",
              str(disk)]
    done = subprocess.run([*prefix, sys.executable, str(script), str(disk), str(cfg)], cwd=ROOT,
                          env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=STARTUP_LIMIT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["first"][0] == 0, got["first"][1][-2000:]
    code, err = got["rerun"]
    line = the_error(err)
    assert code == 2 and str(disk / "out") in line and "No space left on device" in line
    assert got["same"] and got["hidden"] == []
    code, err = got["fresh"]
    line = the_error(err, only=False)
    assert code == 2 and str(disk / "new") in line and "No space left on device" in line
    code, err = got["scratch"]
    line = the_error(err, only=False)
    assert code == 2 and f"scratch folder {disk / 'cache' / 'scratch'}: cannot write: No space left" in line
    assert not got["new_exists"] and got["left_in_cache"] == ["scratch"]


# --- 7. kill -9 and SIGTERM ---------------------------------------------------------------------------


def complete_samples(out: Path) -> int:
    samples = out / "samples"
    return sum((p / "record.json").is_file() for p in samples.iterdir() if not p.name.startswith(".")) \
        if samples.is_dir() else 0


def start(cfg: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "xmllm.cli", "run", str(cfg), "--no-progress"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(proc: subprocess.Popen, ready, what: str, poll: float = 0.01) -> bool:
    """Poll ``ready()`` until true (True) or the process ends first (False)."""
    deadline = time.monotonic() + STARTUP_LIMIT_S
    while not ready():
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, f"no {what} in time"
        time.sleep(poll)
    return True


def stop(proc: subprocess.Popen, sig: int) -> str:
    try:
        os.kill(proc.pid, sig)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read()
    proc.stderr.close()
    return err


@pytest.mark.slow
def test_kill_9_mid_run_and_mid_summary_leaves_nothing_a_rerun_keeps(tmp_path, monkeypatch, model):
    """Killed while computing samples, then while writing the summary and the site: TMPDIR never
    holds an xmllm folder, and the rerun removes the scratch folders the killed processes left."""
    cfg = small_audit(tmp_path, model, n=8, reports=True)
    env = subprocess_env(tmp_path)
    out, tmpdir, scratch = tmp_path / "out", tmp_path / "tmpdir", tmp_path / "cache" / "scratch"

    proc = start(cfg, env)
    assert wait_for(proc, lambda: complete_samples(out) >= 1, "sample"), proc.stderr.read()[-2000:]
    stop(proc, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert not xmllm_scratch(tmpdir)
    if not list(scratch.glob(f"audit-{proc.pid}-*")):  # killed between two samples: leave what it would have
        (scratch / f"audit-{proc.pid}-between").mkdir(parents=True)
    assert xmllm_scratch(scratch)

    proc = start(cfg, env)  # resumes, and is killed while it writes audit.json, summary.html or site/
    in_summary = wait_for(proc, lambda: (out / "audit.json").exists() or any(out.glob(".site-*")), "summary",
                          poll=0.001)
    stop(proc, signal.SIGKILL)
    assert in_summary, "the run ended before it was killed"
    assert not xmllm_scratch(tmpdir)
    if not list(out.glob(f".site-{proc.pid}-*")):  # killed before or after the site's scratch copy existed
        (out / f".site-{proc.pid}-killed").mkdir()
    assert debris(out)
    assert not xmllm_scratch(scratch)  # the first kill's scratch, swept by the second run's worker

    monkeypatch.setenv("XMLLM_CACHE_DIR", str(tmp_path / "cache"))
    outcome = run_audit(load_config(cfg), progress=False)
    assert outcome.total == 8 and outcome.failed == 0 and (out / "site" / "index.md").is_file()
    assert debris(out) == []
    assert not xmllm_scratch(tmpdir, scratch)


@pytest.mark.slow
def test_sigterm_is_a_clean_interruption_that_resumes(tmp_path, monkeypatch, model):
    cfg = small_audit(tmp_path, model, n=8)
    env = subprocess_env(tmp_path)
    out = tmp_path / "out"
    proc = start(cfg, env)
    assert wait_for(proc, lambda: complete_samples(out) >= 1, "sample"), proc.stderr.read()[-2000:]
    err = stop(proc, signal.SIGTERM)
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err and [line for line in err.splitlines() if line.startswith("xmllm:")] == [
        "xmllm: interrupted"]
    done = complete_samples(out)
    assert 1 <= done < 8 and debris(out) == []  # the sample in flight was dropped whole
    assert not xmllm_scratch(tmp_path / "tmpdir", tmp_path / "cache")  # its scratch folder removed on the way out

    monkeypatch.setenv("XMLLM_CACHE_DIR", str(tmp_path / "cache"))
    outcome = run_audit(load_config(cfg), progress=False)
    assert (outcome.computed, outcome.reused, outcome.total) == (8 - done, done, 8)


# --- 8, 9. reports: the same bytes every run; hostile and long user text --------------------------------


def test_explain_twice_writes_the_same_report_but_for_created(tmp_path, capsys):
    from report_runs import tiny_llava
    from tiny_models import tiny_image

    loaded = tiny_llava()
    model_dir = tmp_path / "model"
    loaded.model.save_pretrained(model_dir)
    loaded.processor.save_pretrained(model_dir)
    tiny_image(32, 32).save(tmp_path / "picture.png")
    pages = []
    for name in ("a", "b"):
        code = main(["explain", "--model", str(model_dir), "--image", str(tmp_path / "picture.png"), "--question",
                     "what colour is it", "--explainers", "attention.rollout,perturbation.occlusion",
                     "--out", str(tmp_path / name), "--device", "cpu"])
        assert code == 0, capsys.readouterr().err[-2000:]
        manifest = json.loads((tmp_path / name / "manifest.json").read_text(encoding="utf-8"))
        assert manifest["timings_seconds"]  # run times are kept, in the manifest
        page = (tmp_path / name / "report.html").read_bytes()
        assert b"kv-timings" not in page and b"&#34;seconds&#34;" not in page  # no timings table, no meta seconds
        embedded = page.split(b'id="xmllm-run">', 1)[1].split(b"</script>", 1)[0]
        assert "timings_seconds" not in json.loads(embedded)
        pages.append(page.replace(manifest["created"].encode(), b"CREATED"))
    assert pages[0] == pages[1]


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    from report_runs import make_run

    out = tmp_path_factory.mktemp("faults-run")
    make_run(out, question="what colour is the \u202ekcolb\u202c \x07 bell \x1b[31m\x85 square",
             ids=("attention.rollout", "perturbation.text_ablation"))
    return out


def _render_with_question(saved_run: Path, folder: Path, question: str):
    from html_tree import parse

    from xmllm.report.explained import render_report

    shutil.copytree(saved_run, folder)
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    manifest["sample"]["question"] = question
    (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    page = render_report(folder)
    return page, parse(page)


def test_report_isolates_bidi_and_shows_control_characters(saved_run):
    from html_tree import parse

    from xmllm.report.explained import render_report

    page = render_report(saved_run)
    question = json.loads((saved_run / "manifest.json").read_text(encoding="utf-8"))["sample"]["question"]
    for raw in ("\x07", "\x1b", "\x85"):
        assert raw not in page  # nowhere in the page, not even in its JSON
    doc = parse(page)
    shown = question.replace("\x07", "\\x07").replace("\x1b", "\\x1b").replace("\x85", "\\x85")
    for heading in (doc.find("h1", id="question"), doc.find("p", id="question-text")):
        (bdi,) = [c for c in heading.children if not isinstance(c, str)]
        assert bdi.tag == "bdi" and bdi.text == shown  # the RLO reverses the question at most
        assert [c.text for c in bdi.with_class("ctrl")] == ["\\x07", "\\x1b", "\\x85"]
    assert f"\u2068{shown}\u2069" in doc.find("title").text
    run = json.loads(doc.find("script", id="xmllm-run").text)
    assert run["sample"]["question"] == question  # the data itself is kept exact


def test_report_collapses_a_very_long_question(saved_run, tmp_path):
    question = "is the red square left of the blue circle " * 120  # 5,040 characters
    page, doc = _render_with_question(saved_run, tmp_path / "long", question)
    heading = doc.find("h1", id="question")
    assert heading.text == question[:200] + "\u2026"
    details = doc.find("details", id="question-full")
    assert details.find("p").text == question and "5,040 characters" in details.find("summary").text
    assert len(doc.find("title").text) < 500


def test_audit_summary_isolates_and_collapses_user_text(tmp_path, model):
    from html_tree import parse

    from xmllm.audit.summary import render_summary

    cfg = small_audit(tmp_path, model, n=1)
    assert main(["run", str(cfg), "--no-progress"]) == 0
    data = json.loads((tmp_path / "out" / "audit.json").read_text(encoding="utf-8"))
    long = "\u202eright to left\u202c \x07 " + "is there a red circle " * 250
    row = data["samples"][0]
    row.update(question=long, flags=row["flags"] or [{"kind": "wrong", "detail": "x"}])
    page = render_summary(data)
    assert "\x07" not in page
    doc = parse(page)
    (cell,) = [r.find_all("td")[1] for r in doc.with_class("flagged-row")]
    first, cut, details = [c for c in cell.children if not isinstance(c, str)]
    assert cut.text == "\u2026" and first.tag == "bdi" and first.text.startswith("\u202eright to left\u202c \\x07 ")
    assert len(first.text) == 200 + len("\\x07") - 1
    assert details.tag == "details" and details.find("bdi").text == long.replace("\x07", "\\x07")


# --- 10. xmllm serve: regular files inside the folder only ----------------------------------------------


def test_serve_refuses_listings_links_out_and_special_files(tmp_path):
    from xmllm.commands.serve import make_server

    site, outside = tmp_path / "site", tmp_path / "outside"
    (site / "assets").mkdir(parents=True)
    outside.mkdir()
    (site / "index.html").write_text("<p>home</p>")
    (site / "assets" / "app.css").write_text("p {}")
    (outside / "secret.txt").write_text("secret")
    (outside / "index.html").write_text("secret index")
    (site / "leak.txt").symlink_to(outside / "secret.txt")
    (site / "leakdir").symlink_to(outside)
    (site / "alias.html").symlink_to(site / "index.html")  # a link that stays inside is fine
    os.mkfifo(site / "pipe")
    server = make_server(site, 0)
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def get(path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=20) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, b""

    try:
        assert get("/") == (200, b"<p>home</p>")
        assert get("/alias.html") == (200, b"<p>home</p>")
        assert get("/assets/app.css") == (200, b"p {}")
        for path in ("/assets/", "/assets", "/leak.txt", "/leakdir/", "/leakdir/secret.txt", "/leakdir/index.html",
                     "/pipe", "/../outside/secret.txt", "/%2e%2e/outside/secret.txt", "/missing.html"):
            code, body = get(path)
            assert code == 404 and b"secret" not in body, path
    finally:
        server.shutdown()
        server.server_close()


# --- 11. modes follow the umask -------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_folders_and_files_follow_the_umask(tmp_path, model, umask):
    cfg = small_audit(tmp_path, model, n=1, reports=True)
    previous = os.umask(umask)
    try:
        assert main(["run", str(cfg), "--no-progress"]) == 0
    finally:
        os.umask(previous)
    out = tmp_path / "out"
    paths = [out, *out.rglob("*")]
    assert (out / "site" / "reports").is_dir() and any((out / "samples").glob("*/run/report.html"))
    for path in paths:
        mode = stat.S_IMODE(path.stat().st_mode)
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        assert mode == want, f"{path.relative_to(tmp_path)}: {oct(mode)}, not {oct(want)}"


def test_explain_out_that_is_a_file_or_someone_elses_folder_is_refused_before_the_model(tmp_path, capsys):
    """``explain --out`` naming a file, or a folder holding other files, is one line and exit 2
    before any model work (the model named does not exist); a rerun into an earlier run's
    folder replaces it."""
    from PIL import Image

    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32), (200, 0, 0)).save(image)
    base = ["explain", "--image", str(image), "--question", "What colour?", "--explainers", "gradient.saliency"]
    target = tmp_path / "taken.txt"
    target.write_text("mine")
    code, err = cli([*base, "--model", str(tmp_path / "no-model"), "--out", str(target)], capsys)
    assert code == 2 and "exists and is not a folder" in the_error(err) and target.read_text() == "mine"
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "thesis.tex").write_text("precious")
    code, err = cli([*base, "--model", str(tmp_path / "no-model"), "--out", str(theirs)], capsys)
    assert code == 2 and "a folder with other files (thesis.tex" in the_error(err)
    assert sorted(p.name for p in theirs.iterdir()) == ["thesis.tex"]
    for value in ("0", "-1"):
        code, err = cli([*base, "--max-new-tokens", value, "--out", str(tmp_path / "o")], capsys)
        assert code == 2 and f"--max-new-tokens must be a positive number of tokens, got {value}" in the_error(err)
    assert not (tmp_path / "o").exists()
    first = tmp_path / "run"
    assert cli([*base, "--out", str(first)], capsys)[0] == 0
    assert cli([*base, "--out", str(first)], capsys)[0] == 0  # an earlier run's folder is replaced
