"""The HTML report of ``stabmon inspect --html``: one self-contained file (nothing fetched), the
charts with the findings and actions marked, the head maps of a monitored run, the findings
table; and, where a browser is installed, what it looks like in one."""

import re
import shutil
import subprocess

import pytest

from stabmon.cli import main
from tests.cli.runs import SPIKE_STEP, lightning_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    lightning_run(path, "csv")
    out = path / "report.html"
    assert main(["inspect", str(path), "--html", str(out)]) == 1
    return out


def test_one_self_contained_file(report):
    text = report.read_text()
    assert text.startswith("<!doctype html>") and text.rstrip().endswith("</html>")
    assert not re.search(r"(src|href)\s*=|https?://|<script|<link|@import|url\(", text)  # nothing to fetch


def test_the_charts_the_marks_and_the_tables(report):
    text = report.read_text()
    charts = re.findall(r"<h3>([^<]+)</h3><svg", text)
    assert {"loss", "gradients/norm", "gradients/norm per layer", "attention/max_logit"} <= set(charts), charts
    assert text.count("<polyline") >= len(charts)
    assert f"step {SPIKE_STEP}: loss/last spike" in text  # the finding, marked on the curves
    assert f"step {SPIKE_STEP}: skip_step" in text  # the run's own action, from its event log
    assert "<h2>attention heads, step 0</h2>" in text and "entropy per head" in text
    forensics = text[text.index("<h2>forensic records</h2>"):text.index("<h2>findings (")]
    assert re.search(rf"<tr><td class=num>{SPIKE_STEP}</td><td>[^<]+</td><td>(not_)?reproducible</td>", forensics)
    rows = re.findall(r"<tr><td class=num>(\d+)</td><td style='color:#d62728'>critical</td><td>([^<]+)</td>", text)
    assert sorted(rows) == [(str(SPIKE_STEP), "gradients/norm"), (str(SPIKE_STEP), "loss/last")]


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (Debian: apt-get install chromium)")
def test_it_renders_in_a_browser(report, tmp_path):
    from PIL import Image

    shot = tmp_path / "report.png"
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,1400",
                           f"--screenshot={shot}", report.as_uri()], capture_output=True, text=True, timeout=120)
    assert shot.is_file(), proc.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    assert image.size == (1000, 1400)
    colors = image.getcolors(maxcolors=1 << 20)
    assert len(colors) > 50  # not a blank page: text, curves, marks
    red = sum(n for n, (r, g, b) in colors if r > 180 and g < 90 and b < 90)
    assert red > 20  # the critical marks at the spike
