"""``report/index.html`` in a real browser (headless Chromium): it renders, the settings, best
runs and run table come first, and clicking a column header sorts the table.

Skipped cleanly where no Chromium is installed (Debian: ``apt-get install
chromium-headless-shell``).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from matplotlib import image as mpimg

from sweep.report import build_report
from tests.sweep_builder import build_sweep

BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")
LIB = Path("/usr/lib/chromium")
WIDTH, HEIGHT = 1280, 2000

CONFIG_YAML = """\
data: {name: synthetic, width: 16, n_features: 32, rows: 12000, seed: 0}
sae: {name: untied}
grid: {l1: [0.001, 0.01, 0.1], dict_ratio: [1.0, 2.0], seeds: 2, max_members: 0}
train: {batch_size: 256, lr: 0.01, epochs: 1, log_every: 5, seed: 0}
"""

PROBE = """<script>(() => {
  const y = s => Math.round(document.querySelector(s).getBoundingClientRect().top);
  const ids = () => Array.from(document.querySelectorAll("#runs-table tbody tr"),
                               r => r.cells[0].dataset.s);
  const th = document.querySelector('#runs-table th[data-col="fvu"]');
  const probe = {settings: y("#settings"), best: y("#best-table"), table: y("#runs-table"),
                 plots: y("#plots"), before: ids()};
  th.click(); probe.up = ids(); probe.sort = th.getAttribute("aria-sort");
  th.click(); probe.down = ids();
  const pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = JSON.stringify(probe);
  document.body.appendChild(pre);
})();</script>"""


def find_browser() -> str | None:
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    for name in ("chromium-headless-shell", "chromium"):
        path = LIB / name
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return None


@pytest.fixture(scope="module")
def browser() -> str:
    path = find_browser()
    if path is None:
        pytest.skip(
            "no headless Chromium on this machine (apt-get install chromium-headless-shell)"
        )
    return path


@pytest.fixture(scope="module")
def report(browser, tiny_store, tmp_path_factory) -> tuple[Path, list[dict]]:
    sweep_dir = build_sweep(tiny_store, tmp_path_factory.mktemp("browser") / "sweep")
    (sweep_dir / "config.yaml").write_text(CONFIG_YAML)
    return build_report(sweep_dir, device="cpu", log_media=False)


def run_browser(browser: str, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp / 'profile'}",
        f"--window-size={WIDTH},{HEIGHT}",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def test_page_renders_with_its_tables_at_the_top(browser, report, tmp_path):
    out, _ = report
    png = tmp_path / "page.png"
    res = run_browser(browser, tmp_path, f"--screenshot={png}", (out / "index.html").as_uri())
    assert png.is_file(), res.stderr[-3000:]
    img = mpimg.imread(str(png))[..., :3]  # (H, W, 3) in [0, 1]
    assert img.shape[:2] == (HEIGHT, WIDTH)
    assert float(img.std()) > 0.05, "the page looks blank"
    top = img[:900]
    ink = float((top.mean(axis=2) < 0.75).mean())
    assert ink > 0.02, f"the top of the page is nearly empty ({ink:.3f} ink)"
    best_rows = (abs(top - [230 / 255, 244 / 255, 230 / 255]).max(axis=2) < 0.02).mean()
    assert float(best_rows) > 0.01, "no highlighted best run near the top"


def test_table_near_top_and_sorts_on_click(browser, report, tmp_path):
    out, rows = report
    page = (out / "index.html").read_text()
    probe_page = out / "probe.html"  # next to index.html so relative links resolve the same
    probe_page.write_text(page.replace("</body>", PROBE + "</body>"))
    try:
        res = run_browser(browser, tmp_path, "--dump-dom", probe_page.as_uri())
    finally:
        probe_page.unlink()
    found = re.search(r'<pre id="probe">(.*?)</pre>', res.stdout, re.S)
    assert found, (res.stdout[-2000:], res.stderr[-2000:])
    probe = json.loads(html.unescape(found.group(1)))
    assert probe["settings"] < 150 < probe["best"] < probe["table"] < 1000 < probe["plots"]
    fvu = {r["run_id"]: r["fvu"] for r in rows}
    assert sorted(probe["before"]) == sorted(fvu)
    assert probe["sort"] == "ascending" and probe["up"] == sorted(fvu, key=fvu.get)
    assert probe["down"] == sorted(fvu, key=fvu.get, reverse=True)
