"""A picture of a report for the docs: ``python -m xmllm.report.screenshot RUN_DIR OUT.png``.

Opens ``RUN_DIR/report.html`` (rendered first if missing) in Debian's Chromium through
Playwright, clicks a patch of the first image view that has an answer-token strip (so the
patch -> answer colouring shows), and captures the page from the top to the end of that
explainer's section at twice the CSS resolution. Needs the ``test`` extra (Playwright) and
/usr/bin/chromium; it never downloads a browser.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..cli import USER_ERROR
from xmllm.errors import XmllmError

CHROMIUM = Path("/usr/bin/chromium")
WIDTH = 1280
SCALE = 2
IDLE_MS = 120_000

_FIRST_STRIP = """() => {
  const doc = Bokeh.documents[0];
  const strip = doc.roots().flatMap(r => [...r.references()]).find(m => m.name && m.name.endsWith(':strip'));
  if (!strip) return null;
  const base = strip.name.slice(0, -':strip'.length);
  return {section: base.split(':')[0], cells: base + ':cells', figure: base + ':figure'};
}"""

_CELL_POINT = """([cells, figure]) => {
  const doc = Bokeh.documents[0], src = doc.get_model_by_name(cells);
  const view = Bokeh.index.find_one(doc.get_model_by_name(figure));
  let best = 0;
  src.data.value.forEach((v, i) => { if (v > src.data.value[best]) best = i; });
  const box = view.canvas_view.el.getBoundingClientRect();
  return {x: box.left + view.frame.x_scale.compute(src.data.x[best]),
          y: box.top + view.frame.y_scale.compute(src.data.y[best])};
}"""


def screenshot(run_dir: Path, out: Path, section: str | None = None) -> Path:
    """Capture ``run_dir``'s report into ``out`` (PNG); returns ``out``."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise XmllmError("screenshots need Playwright (pip install 'xmllm[test]')") from None
    if not CHROMIUM.exists():
        raise XmllmError(f"screenshots need Debian's Chromium at {CHROMIUM} (apt-get install chromium)")
    from .explained import REPORT, write_report

    page_path = Path(run_dir) / REPORT
    if not page_path.is_file():
        write_report(run_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM))
        page = browser.new_page(viewport={"width": WIDTH, "height": 1000}, device_scale_factor=SCALE)
        page.route("**/*", lambda r: r.continue_() if r.request.url.startswith(("file:", "data:", "blob:"))
                   else r.abort())
        page.goto(page_path.resolve().as_uri())
        page.wait_for_function("() => window.Bokeh && Bokeh.documents.length && Bokeh.documents[0].is_idle",
                               timeout=IDLE_MS)
        target = page.evaluate(_FIRST_STRIP)
        chosen = section or (target["section"] if target else None)
        if target and target["section"] == chosen:
            page.evaluate("(name) => Bokeh.index.find_one(Bokeh.documents[0].get_model_by_name(name)).el"
                          ".scrollIntoView({block: 'center'})", target["figure"])
            point = page.evaluate(_CELL_POINT, [target["cells"], target["figure"]])
            page.mouse.click(point["x"], point["y"])
            page.wait_for_timeout(500)
        page.evaluate("() => { document.activeElement && document.activeElement.blur(); window.scrollTo(0, 0); }")
        bottom = page.evaluate("""(id) => {
            const el = id ? document.querySelector(`section[data-explainer="${id}"]`) : null;
            return Math.ceil((el || document.querySelector('#sample')).getBoundingClientRect().bottom + window.scrollY);
        }""", chosen)
        page.screenshot(path=str(out), clip={"x": 0, "y": 0, "width": WIDTH, "height": bottom + 16}, full_page=True)
        browser.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xmllm.report.screenshot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run folder (xmllm explain --out)")
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("--section", help="explainer id whose section ends the picture (default: the first with "
                                          "a patch -> answer view)")
    args = parser.parse_args(argv)
    try:
        print(screenshot(args.run_dir, args.out, args.section))
    except XmllmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USER_ERROR
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
