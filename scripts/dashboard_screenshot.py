"""Open a report page (``moe-lightning report`` writes it as ``index.html``: a run's dashboard, or the page of a sweep)
in headless Chromium through Playwright, report script errors, outside requests, sideways scrolling and untitled
chart axes, and save a screenshot of the page.

Usage:
    python scripts/dashboard_screenshot.py runs/<run folder> docs/assets/dashboard.png
    python scripts/dashboard_screenshot.py PAGE.html OUT.png --width 1400 --max-height 5000

PAGE is a page, or a run folder (its ``report/index.html``).

Chromium comes from the system (the Debian package ``chromium``; ``.ci/run`` installs it), else from Playwright's
own browser download when there is one.
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass, field
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
LOAD_TIMEOUT_MS = 180_000


def system_chromium() -> str | None:
    """The first Chromium-family browser on ``PATH``, or None."""
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


@dataclass
class Rendered:
    """What the page did in the browser.

    Attributes:
        errors: uncaught script errors and console errors.
        outside: requests the page made to anything but its own file and inline data.
        charts: ``(data-kind, data-layer, number of rendered Plotly SVG layers)`` of every ``div.chart``.
        traces: whatever ``extract`` (a JavaScript function of the page) returned, when given.
        layout: how the page sits in the window (:data:`LAYOUT_JS`): its ``width`` and the window's ``window``
            in px, the ``wide`` elements that scroll sideways, the ``untitled`` axes ``[kind, layer, axis]`` of
            every chart that hold a trace, and each chart's ``legends`` (the names its legend lists).
    """

    errors: list[str] = field(default_factory=list)
    outside: list[str] = field(default_factory=list)
    charts: list[tuple[str, str, int]] = field(default_factory=list)
    traces: object = None
    layout: dict = field(default_factory=dict)


CHARTS_JS = """els => els.map(e => [e.dataset.kind, e.dataset.layer, e.querySelectorAll('svg.main-svg').length])"""
LAYOUT_JS = """() => {
  const wide = [...document.querySelectorAll('body *')].filter(e => e.scrollWidth > e.clientWidth + 1
      && getComputedStyle(e).overflowX !== 'visible' && getComputedStyle(e).overflowX !== 'hidden')
    .map(e => e.tagName.toLowerCase() + (e.className ? '.' + e.className : ''));
  const untitled = [], legends = [];
  for (const div of document.querySelectorAll('div.chart')) {
    const plot = div.querySelector('.js-plotly-plot');
    if (!plot) continue;
    const axes = new Set();
    for (const t of plot._fullData) {
      if (t.xaxis) axes.add('xaxis' + t.xaxis.slice(1));
      if (t.yaxis) axes.add('yaxis' + t.yaxis.slice(1));
    }
    for (const axis of axes) {
      const title = plot._fullLayout[axis] && plot._fullLayout[axis].title;
      if (!title || !title.text) untitled.push([div.dataset.kind, div.dataset.layer, axis]);
    }
    const names = plot._fullData.filter(t => t.showlegend && t.visible !== false).map(t => t.name);
    legends.push([div.dataset.kind, div.dataset.layer, plot._fullLayout.showlegend ? names : []]);
  }
  return {width: document.documentElement.scrollWidth, window: window.innerWidth, wide, untitled, legends};
}"""
# The page's span in px from the <h2> headed start (the top when null) to the one headed stop (the end when null).
SPAN_JS = """([start, stop]) => {
  const at = text => { const h = [...document.querySelectorAll('h2')].find(h => h.textContent === text);
                       return h ? h.getBoundingClientRect().top + window.scrollY : null; };
  const end = document.documentElement.scrollHeight;
  return [start ? (at(start) ?? 0) : 0, stop ? (at(stop) ?? end) : end];
}"""


def render(
    page_path: str | Path,
    screenshot: str | Path,
    executable: str | None = None,
    width: int = 1400,
    max_height: int | None = None,
    extract: str | None = None,
    extract_arg: object = None,
    start: str | None = None,
    stop: str | None = None,
) -> Rendered:
    """Open ``page_path``, wait until it has loaded, and save a full-page screenshot (cut at ``max_height`` px),
    or the part from the section headed ``start`` to the one headed ``stop``.

    Raises:
        RuntimeError: no browser (pass ``executable``, install the Debian package ``chromium``, or run
            ``playwright install chromium``).
    """
    from playwright.sync_api import Error, sync_playwright

    executable = executable or system_chromium()
    rendered = Rendered()
    with sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        except Error as error:
            raise RuntimeError(f"no browser to open the page with: {error.message.splitlines()[0]}") from error
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.on("pageerror", lambda error: rendered.errors.append(str(error)))
            page.on("console", lambda message: message.type == "error" and rendered.errors.append(message.text))
            page.on(
                "request",
                lambda request: (
                    None if request.url.startswith(("file:", "data:")) else rendered.outside.append(request.url)
                ),
            )
            # A page of many charts on a busy 2-core machine can take longer than Playwright's 30 s default.
            page.set_default_timeout(LOAD_TIMEOUT_MS)
            page.goto(Path(page_path).resolve().as_uri(), wait_until="load")
            rendered.charts = [tuple(chart) for chart in page.eval_on_selector_all("div.chart", CHARTS_JS)]
            if extract is not None:
                rendered.traces = page.evaluate(extract, extract_arg)
            rendered.layout = page.evaluate(LAYOUT_JS)
            top, bottom = page.evaluate(SPAN_JS, [start, stop])
            clip = {"x": 0, "y": top, "width": width, "height": min(bottom - top, max_height or bottom - top)}
            page.screenshot(path=str(screenshot), full_page=True, clip=clip)
        finally:
            browser.close()
    return rendered


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", help="the dashboard's index.html, or a run folder (its report/index.html)")
    parser.add_argument("out", help="the PNG to write")
    parser.add_argument("--width", type=int, default=1400, help="viewport width in px")
    parser.add_argument("--max-height", type=int, default=None, help="cut the page at this height in px")
    parser.add_argument("--start", default=None, help="begin at the section with this heading")
    parser.add_argument("--stop", default=None, help="end at the section with this heading")
    parser.add_argument("--executable", default=None, help=f"the browser (default: the first of {BROWSERS} on PATH)")
    args, extra = parser.parse_known_args()
    if extra:  # a pattern that matched several runs: one page makes one screenshot
        parser.error(f"one PAGE and one OUT, got {[args.page, args.out, *extra]}; name one run's folder or page")
    page = Path(args.page)
    if page.is_dir():
        page = page / "report" / "index.html"
    if not page.is_file():
        parser.error(f"{str(page)!r} is not a page; expected a report's index.html or a run folder holding one")
    args.page = str(page)
    rendered = render(
        args.page, args.out, args.executable, args.width, args.max_height, start=args.start, stop=args.stop
    )
    kinds = sorted({kind for kind, _, _ in rendered.charts})
    print(
        f"{len(rendered.charts)} charts ({', '.join(kinds)}), {len(rendered.errors)} script errors, "
        f"{len(rendered.outside)} outside requests; screenshot: {args.out}"
    )
    layout = rendered.layout
    if layout["width"] > layout["window"] or layout["wide"]:
        print(f"  scrolls sideways: page {layout['width']} px in a {layout['window']} px window; {layout['wide']}")
    for kind, layer, axis in layout["untitled"]:
        print(f"  untitled axis: {kind} {layer} {axis}")
    for line in rendered.errors + rendered.outside:
        print(f"  {line}")


if __name__ == "__main__":
    main()
