"""The report in a real headless Chromium: it renders, its script runs, and the page makes no request.

Needs the Debian packages ``chromium`` (and ``chromium-driver`` in CI images); skipped when
``/usr/bin/chromium`` (or ``$HEAVYTAIL_CHROMIUM``) is absent.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from heavytail.report import write_compare_report, write_report

CHROMIUM = Path(os.environ.get("HEAVYTAIL_CHROMIUM", "/usr/bin/chromium"))

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason=f"headless Chromium not installed at {CHROMIUM}"),
]

# A quiet, isolated browser: no sandbox (CI runs as root), no GPU, no sync or updates, and every host name
# resolves to nothing, so a request the page made could only fail; the net log shows whether one was made.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--host-resolver-rules=MAP * ~NOTFOUND",
)


@dataclass
class Page:
    dom: str
    console: list[str]  # console messages the page produced (CSP violations, script errors, logs)
    page_requests: list[str]  # URLs that the page itself asked the network stack for


def _chromium(profile: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    cmd = [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def _page_requests(net_log: Path) -> list[str]:
    """URL requests made on behalf of a page loaded from file:// (the browser's own background requests,
    such as its clock or update checks, carry no page origin and are left out)."""
    text = net_log.read_text(encoding="utf-8")
    try:
        log = json.loads(text)
    except ValueError:  # a log cut at exit lacks its closing brackets
        log = json.loads(text.rstrip().rstrip(",") + "]}")
    names = {v: k for k, v in log["constants"]["logEventTypes"].items()}
    urls = []
    for event in log.get("events", []):
        params = event.get("params") or {}
        if names.get(event.get("type")) != "URL_REQUEST_START_JOB" or "url" not in params:
            continue
        if params.get("initiator") != "not an origin" or "file://" in str(params.get("network_isolation_key")):
            urls.append(params["url"])
    return urls


def load(tmp_path: Path, html: Path) -> Page:
    """Open ``html`` in Chromium, let its scripts run, and collect the DOM, the console and the requests."""
    net_log = tmp_path / f"{html.stem}.netlog.json"
    proc = _chromium(
        tmp_path / f"{html.stem}-profile",
        "--enable-logging=stderr",
        "--v=0",
        f"--log-net-log={net_log}",
        "--dump-dom",
        html.as_uri(),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return Page(dom=proc.stdout, console=console, page_requests=_page_requests(net_log))


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory, write_run_dir: Callable[..., Path], monitored) -> dict[str, Page]:
    """One Chromium load per page, shared by the assertions below."""
    tmp = tmp_path_factory.mktemp("browser")
    run = write_run_dir(tmp / "run")
    lion = write_run_dir(tmp / "lion", optimizer="Lion", with_adam=False, seed=1)
    evil = write_run_dir(
        tmp / "evil",
        layers=[
            "embed.weight",
            "<script>alert(1)</script>",
            "blocks.\"&'.weight",
            "x</script><img src=x onerror=alert(2)>",
        ],
        heavy_layer="<script>alert(1)</script>",
        run_name="<b>run</b>\"&'",
        extra={"note": "</script><script>alert(3)</script>"},
    )
    files = {
        "report": write_report(run),
        "compare": write_compare_report({"AdamW": run, "Lion": lion}, tmp / "compare.html", note="same seed"),
        "evil": write_report(evil),
        # A real monitored run, killed: the incomplete banner, and pre- and post-clip norms on one chart.
        "real": write_report(monitored.killed, tmp / "real.html"),
    }
    # A control page that does fetch: proves the net log would show the report's requests if it made any.
    control = tmp / "control.html"
    control.write_text(
        '<!DOCTYPE html><html><body><img src="http://heavytail-test.invalid/x.png">'
        '<link rel="stylesheet" href="https://heavytail-test.invalid/s.css">'
        '<script>fetch("https://heavytail-test.invalid/y").catch(function () {});</script></body></html>',
        encoding="utf-8",
    )
    files["control"] = control
    return {name: load(tmp, path) for name, path in files.items()}


def _count_charts(dom: str) -> int:
    return len(re.findall(r"<svg [^>]*data-chart=", dom))


# ------------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("name", ["report", "compare", "evil", "real"])
def test_script_ran_and_every_chart_has_its_data(pages: dict[str, Page], name: str) -> None:
    dom = pages[name].dom
    assert 'data-ht-ready="1"' in dom
    n_charts = _count_charts(dom)
    assert n_charts >= 6
    # The page's self-check: every heatmap's embedded values decode to rows x cols.
    assert f'data-ht-charts="{n_charts}"' in dom
    assert 'id="ht-tooltip"' in dom  # created by the script


@pytest.mark.parametrize("name", ["report", "compare", "evil", "real"])
def test_no_console_errors_or_policy_violations(pages: dict[str, Page], name: str) -> None:
    assert pages[name].console == []


@pytest.mark.parametrize("name", ["report", "compare", "evil", "real"])
def test_page_makes_no_request(pages: dict[str, Page], name: str) -> None:
    assert pages[name].page_requests == []


def test_net_log_sees_a_fetching_page(pages: dict[str, Page]) -> None:
    requests = pages["control"].page_requests
    assert any("heavytail-test.invalid/x.png" in url for url in requests)
    assert any("heavytail-test.invalid/s.css" in url for url in requests)


def test_report_elements_after_scripts(pages: dict[str, Page]) -> None:
    dom = pages["report"].dom
    for section in ("sec-loss", "sec-tail-index", "sec-noise-tail-index", "sec-kurtosis", "sec-ratio", "sec-alerts"):
        assert f'id="{section}"' in dom
    assert len(re.findall(r'<svg class="ht-chart ht-heatmap"', dom)) == 4
    assert len(re.findall(r'<image class="ht-cells"', dom)) == 4
    assert len(re.findall(r'<g class="ht-alert-marker"', dom)) == 4
    assert "<title>" not in dom.split('class="ht-alert-marker"', 1)[1][:200]  # replaced by the read-out


def test_real_run_shows_its_banner_and_both_norms(pages: dict[str, Page]) -> None:
    dom = pages["real"].dom
    banner = re.search(r'<div class="ht-banner" id="run-status" role="status">(.*?)</div>', dom, re.S)
    assert banner is not None and "Incomplete run" in banner.group(1)
    norm_chart = re.search(r'<svg [^>]*aria-label="global gradient norm over optimizer steps".*?</svg>', dom, re.S)
    assert norm_chart is not None
    assert len(re.findall(r'<path class="ht-series"', norm_chart.group(0))) == 2
    assert "grad/norm_preclip (before clipping)" in norm_chart.group(0)


def test_injected_markup_stays_text(pages: dict[str, Page]) -> None:
    dom = pages["evil"].dom
    assert len(re.findall(r"<script\b", dom)) == 2
    assert re.findall(r"<img\b", dom) == []
    assert re.findall(r"<[^>]*\son\w+=", dom) == []  # no element got an event-handler attribute
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom
    assert "<b>run</b>" not in dom


def test_screenshot_is_not_blank(tmp_path: Path, write_run_dir: Callable[..., Path], png_pixels) -> None:
    report = write_report(write_run_dir(tmp_path / "run"))
    shot = tmp_path / "shot.png"
    proc = _chromium(
        tmp_path / "profile", f"--screenshot={shot}", "--window-size=1400,2000", "--hide-scrollbars", report.as_uri()
    )
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    pixels = png_pixels(shot.read_bytes())[..., :3]
    assert pixels.shape[:2] == (2000, 1400)
    coarse = (pixels // 4).astype(np.int32)  # so that anti-aliasing alone does not count
    colours = np.unique((coarse[..., 0] << 12) | (coarse[..., 1] << 6) | coarse[..., 2])
    assert len(colours) > 200
    header = pixels[5:60, 5:1395].reshape(-1, 3)
    assert np.mean(np.all(np.abs(header.astype(int) - (0x18, 0x22, 0x3B)) < 6, axis=1)) > 0.5  # the dark header
    red = (pixels[..., 0] > 150) & (pixels[..., 1] < 70) & (pixels[..., 2] < 80)
    assert red.sum() > 200  # the alpha < 2 cells, the red bar, the critical marker


HOVER_PROBE = """<script>
(function () {
  var out = [];
  function tip() {
    var t = document.getElementById("ht-tooltip");
    return t.style.display === "block" ? "shown: " + t.textContent : "hidden";
  }
  function hover(el, fx, fy) {
    var r = el.getBoundingClientRect();
    el.dispatchEvent(new MouseEvent("mousemove", {bubbles: true, clientX: r.left + r.width * fx,
                                                  clientY: r.top + r.height * fy}));
    out.push(tip());
  }
  var cells = document.querySelector('svg[data-family="grad/hill_alpha"] image.ht-cells');
  hover(cells, 30.5 / 50, 3.5 / 6);
  hover(document.querySelector(".ht-alert-marker line"), 0.5, 0.5);
  hover(document.querySelector("svg.ht-line"), 0.5, 0.5);
  hover(document.querySelector("header"), 0.5, 0.5);
  var pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = out.join("\\n");
  document.body.appendChild(pre);
})();
</script>"""


def test_hover_read_outs(tmp_path: Path, write_run_dir: Callable[..., Path]) -> None:
    report = write_report(write_run_dir(tmp_path / "run"))
    probe = tmp_path / "probe.html"
    probe.write_text(report.read_text(encoding="utf-8").replace("</body>", HOVER_PROBE + "</body>"), encoding="utf-8")
    dom = load(tmp_path, probe).dom
    lines = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S).group(1).splitlines()
    heatmap, marker, line, outside = lines
    assert heatmap.startswith("shown: blocks.1.attn.qkv.weight") and "step 310" in heatmap
    value = float(re.search(r"tail index α: ([0-9.]+)", heatmap).group(1))
    assert value < 2.0
    assert marker.startswith("shown: step 300: 1 alert") and "tail_index_drop (critical)" in marker
    assert line.startswith("shown: step ") and "loss: " in line
    assert outside == "hidden"
