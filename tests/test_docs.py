"""The README and the documentation site: every ```python block runs as-is, the README stays a short front page
whose relative links resolve, and ``mkdocs build --strict`` passes."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", flags=re.DOTALL | re.MULTILINE)
MAX_README_LINES = 250


def _blocks() -> list[tuple[str, str]]:
    """(id, code) for every python block, with ids like ``docs/training.md:2`` (1-based per file)."""
    blocks = []
    for page in PAGES:
        for i, match in enumerate(FENCE.finditer(page.read_text(encoding="utf-8")), start=1):
            blocks.append((f"{page.relative_to(ROOT).as_posix()}:{i}", match.group(1)))
    return blocks


BLOCKS = _blocks()
CODES = dict(BLOCKS)


def test_docs_have_examples():
    files = {block_id.rsplit(":", 1)[0] for block_id, _ in BLOCKS}
    assert "README.md" in files
    assert len(BLOCKS) >= 8


@pytest.fixture(scope="module")
def block_results(request, tmp_path_factory) -> dict[str, str | None]:
    """Every selected block's traceback (None if it ran), from one fresh interpreter that runs them in turn, each
    in a namespace and a folder of its own (tests/scripts/doc_blocks.py)."""
    selected = [
        item.callspec.id
        for item in request.session.items
        if getattr(item, "originalname", "") == "test_python_block_runs"
    ]
    work = tmp_path_factory.mktemp("doc_blocks")
    blocks, results = work / "blocks.json", work / "results.json"
    blocks.write_text(json.dumps({block_id: CODES[block_id] for block_id in selected}), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "MPLBACKEND": "Agg"}
    command = [sys.executable, str(ROOT / "tests" / "scripts" / "doc_blocks.py"), str(blocks), str(results), str(work)]
    run = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    found = json.loads(results.read_text(encoding="utf-8")) if results.exists() else {}
    # a block that killed the interpreter (or ran past the timeout) has no entry: its failure is the runner's stderr
    return {
        block_id: found.get(block_id, f"no result (exit {run.returncode}):\n{run.stderr[-3000:]}")
        for block_id in selected
    }


@pytest.mark.parametrize("block_id", [block_id for block_id, _ in BLOCKS], ids=[block_id for block_id, _ in BLOCKS])
def test_python_block_runs(block_id, block_results):
    error = block_results[block_id]
    assert error is None, f"{block_id} failed:\n{CODES[block_id]}\n{error[-3000:]}"


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines (at most {MAX_README_LINES})"


def test_readme_relative_links_exist():
    text = README.read_text(encoding="utf-8")
    text = re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE)  # links inside code are not links
    targets = re.findall(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text)
    assert targets, "README.md has no links"
    missing = []
    for target in targets:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # absolute URL or an anchor in the README itself
        path = unquote(target.split("#", 1)[0])
        if not (ROOT / path).exists():
            missing.append(target)
    assert not missing, f"README.md links to missing files: {missing}"


@pytest.mark.integration  # the whole docs site
def test_mkdocs_build_strict(tmp_path):
    # No skip when mkdocs is missing: `make install` installs the docs extra, so its absence is a failure.
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    site = tmp_path / "site"
    assert (site / "index.html").exists()
    # The site opens from disk: every page is a file (a link to a folder shows a bare listing over file://), no
    # script comes from the network, and the search index is a script (a page over file:// may not fetch JSON).
    assert (site / "api" / "geometry.html").exists() and not (site / "api" / "geometry").exists()
    assert 'href="dashboards.html"' in (site / "index.html").read_text()
    scripts = {m for page in site.rglob("*.html") for m in re.findall(r'<script src="([^"]+)"', page.read_text())}
    assert scripts and not [s for s in scripts if s.startswith(("http:", "https:", "//"))]
    assert (site / "search" / "search_index.js").read_text().startswith("var __index = {")
    _search_from_disk(site)


def _search_from_disk(site: Path) -> None:
    """Open the built site over file:// in Chromium, follow a link and search it."""
    pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")
    from playwright.sync_api import Error, sync_playwright

    browser_path = next((p for n in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(n))), None)
    with sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        except Error as error:
            pytest.skip(f"no browser could be started ({error.message.splitlines()[0]}); .ci/run installs chromium")
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto((site / "index.html").as_uri())
            page.click("nav.md-nav >> text=Dashboards")
            page.wait_for_load_state()
            assert page.url.endswith("/dashboards.html") and page.inner_text("h1").startswith("Dashboards")
            page.keyboard.press("/")
            page.keyboard.type("GeometryMonitor")
            page.wait_for_selector(".md-search-result__item", timeout=30_000)
            assert "matching document" in page.inner_text(".md-search-result__meta")
        finally:
            browser.close()
