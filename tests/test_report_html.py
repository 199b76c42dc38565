"""The HTML report in a real browser (headless Chromium): it reads at phone and desktop widths,
and hostile names stay text.

Headless Chromium cannot make its window narrower than 500 px, so each width is emulated by
an iframe exactly that many CSS pixels wide, in which the report lays out as on a phone; a
script in the outer page measures the report and writes the result into the DOM, which
``--dump-dom`` prints. Chromium is required, not optional: CI installs it
(``apt-get install -y chromium``). ``LPFT_REPORT_SCREENSHOTS=docs/img`` also saves the two
screenshots of the docs (report_phone.png, report_desktop.png) there.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lpft.results.report import write_report
from lpft.results.selection import IDValidation, OODOracle
from lpft.runs import RunRecord

PHONE, DESKTOP = 360, 1280
ENVIRONMENT = {"lpft": "0.1.0", "torch": "2.14.1+cu130", "python": "3.11.7", "numpy": "2.4.6", "device": "cpu",
               "command": "lpft reproduce"}


def _chromium() -> str:
    """The Chromium binary; its absence fails the test, so CI cannot silently skip the browser checks."""
    path = os.environ.get("LPFT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("headless Chromium is required for the report's browser tests: apt-get install -y chromium "
                    "(or set LPFT_CHROMIUM to a Chromium or Chrome binary)")
    return path


def run_chromium(tmp_path: Path, page: Path, *args: str) -> str:
    """Chromium's stdout after loading ``page`` headless with ``args`` (no network, a throwaway profile)."""
    command = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=5000", *args,
               page.resolve().as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


# The outer page's script: the report's layout inside the frame, once everything (plots too) has loaded.
MEASURE = """
const frame = document.getElementById('report');
frame.addEventListener('load', () => {
  const doc = frame.contentDocument, root = doc.documentElement, width = root.clientWidth;
  const box = (e) => { const r = e.getBoundingClientRect(); return {left: r.left, right: r.right, top: r.top,
                                                                      bottom: r.bottom}; };
  const result = {
    innerWidth: frame.contentWindow.innerWidth, width: width, pageWidth: root.scrollWidth,
    outside: [...doc.body.querySelectorAll('*')].filter(e => !e.closest('.scroll') && box(e).right > width + 0.5)
               .map(e => e.tagName + '.' + e.className),
    tables: [...doc.querySelectorAll('.scroll')].map(e => ({...box(e), scrollWidth: e.scrollWidth,
                                                             clientWidth: e.clientWidth})),
    images: [...doc.images].map(e => ({...box(e), natural: e.naturalWidth})),
    scripts: doc.querySelectorAll('script').length,
    headings: [...doc.querySelectorAll('h2')].map(e => e.textContent),
  };
  frame.style.height = Math.ceil(box(doc.body).bottom) + 'px';  // the whole report, for screenshots
  document.getElementById('result').textContent = JSON.stringify(result);
});
"""


def framed(report: Path, width: int, out: Path) -> Path:
    """A page that shows ``report`` in a frame ``width`` CSS px wide at its top left, and measures it."""
    page = report.read_text()
    out.write_text(
        "<!doctype html><html><head><meta charset='utf-8'><style>body{margin:0}iframe{border:0;display:block}"
        f"</style></head><body><iframe id='report' style='width:{width}px;height:20000px' "
        f"srcdoc='{html.escape(page, quote=True)}'></iframe><pre id='result' hidden></pre><script>{MEASURE}</script>"
        "</body></html>"
    )
    return out


def measure(tmp_path: Path, report: Path, width: int) -> dict:
    """The report's layout at ``width`` CSS px, measured by Chromium."""
    dom = run_chromium(tmp_path, framed(report, width, tmp_path / f"frame_{width}.html"), "--window-size=1300,900",
                       "--dump-dom")
    found = re.search(r"<pre id=\"result\" hidden=\"\">(.*?)</pre>", dom, flags=re.S)
    assert found and found.group(1), f"the measuring script did not run; DOM: {dom[-500:]}"
    return json.loads(html.unescape(found.group(1)))


def screenshot(tmp_path: Path, report: Path, width: int, height: int, path: Path) -> Image.Image:
    """The top ``height`` px of the report at ``width`` CSS px (the window is cropped to the frame)."""
    frame = framed(report, width, tmp_path / f"shot_{width}.html")
    run_chromium(tmp_path, frame, f"--window-size={width},{height}", f"--screenshot={path}", "--hide-scrollbars")
    return Image.open(path).convert("RGB")


def realistic_trials() -> list[RunRecord]:
    """A small sweep as `lpft reproduce` writes it: emoji-styles with 3 OOD splits and 3 seeds (LP, FT
    and LP-FT over 3 lrs, epochs 0 to 3 scored on every split), and digits with only 2 seeds."""
    rng = np.random.default_rng(0)
    out = []
    setups = [("emoji-styles", "efficientnet-lite0", {"image_size": 48}, ["fluent-emoji-flat", "openmoji", "twemoji"],
               (0, 1, 2)), ("digits", "efficientnet-lite0", {"image_size": 32}, ["optdigits"], (0, 1))]
    base = {"lp": (0.49, 0.35), "ft": (0.59, 0.49), "lpft": (0.56, 0.45)}
    for task, backbone, options, ood_names, seeds in setups:
        splits = ["id_val", "id_test", *(f"ood/{n}" for n in ood_names)]
        for method, lrs in (("lp", [None]), ("ft", [1e-3, 3e-3, 1e-2]), ("lpft", [3e-5, 1e-4, 3e-4])):
            for lr in lrs:
                for seed in seeds:
                    id_acc, ood_acc = base[method]
                    noise = rng.normal(0, 0.08 if task == "digits" else 0.02)  # digits' seeds disagree: wide intervals
                    start = base["lp"][0] if method == "lpft" else 0.3 * id_acc  # epoch 0: the probe, or a random head
                    curve = [min(0.99, start + (id_acc - start + noise) * e / 3) for e in range(4)]
                    ood_factor = [ood_acc / id_acc * (1.3 - 0.1 * e) for e in range(4)]  # later epochs distort OOD
                    history = [{"epoch": e, "train_loss": None if e == 0 else 1.0 / (e + 1), "accuracy": {
                        s: round(c * (1.0 if s.startswith("id") else ood_factor[e]) + rng.normal(0, 0.01), 4)
                        for s in splits}} for e, c in enumerate(curve)]
                    kept = max(history, key=lambda h: h["accuracy"]["id_val"])
                    metrics = {s: {"accuracy": a, "ece": round(rng.uniform(0.04, 0.15), 4),
                                   "ece_ts": round(rng.uniform(0.03, 0.08), 4), "nll": 1.2, "nll_ts": 1.1,
                                   "brier": 0.6, "brier_ts": 0.55} for s, a in kept["accuracy"].items()}
                    if method == "lp":
                        hps, selected, history = {"C": "auto", "seed": seed}, {"C": 0.00316}, [{"C": 0.00316}]
                    else:
                        hps = {"lr": lr, "epochs": 3, "batch_size": 32, "momentum": 0.9, "seed": seed}
                        selected = {"epoch": kept["epoch"]}
                    started = {"started_at": f"2026-12-03T09:{len(out):02d}:00+00:00"}
                    timings = {"fit_seconds": round(rng.uniform(20, 120), 1)}
                    out.append(RunRecord(task, backbone, method, hps, selected, metrics, history, timings,
                                         ENVIRONMENT | started, options))
    return out


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    write_report(realistic_trials(), out, [IDValidation(), OODOracle()], title="lpft reproduce",
                 sweeps=["reproduce-emoji-styles", "reproduce-digits"], db="runs/reproduce/results.sqlite",
                 command=["lpft", "reproduce"])
    return out / "results.html"


@pytest.mark.parametrize("width", [PHONE, DESKTOP])
def test_the_page_fits_the_screen_and_only_tables_scroll_sideways(report, tmp_path, width):
    m = measure(tmp_path, report, width)
    assert m["innerWidth"] == width  # the frame emulates the screen
    assert m["pageWidth"] <= m["width"], "the page itself scrolls sideways"
    assert m["outside"] == [], "elements outside a table's scroll box stick out of the screen"
    assert len(m["tables"]) == 4 and all(t["left"] >= 0 and t["right"] <= m["width"] + 0.5 for t in m["tables"])
    assert len(m["images"]) == 4 and all(i["natural"] > 0 and i["right"] <= m["width"] + 0.5 for i in m["images"])
    if width == PHONE:  # the tables are wider than a phone: they scroll inside their own box
        assert all(t["scrollWidth"] > t["clientWidth"] for t in m["tables"])
        assert all(i["right"] - i["left"] > 0.8 * m["width"] for i in m["images"])  # plots use the width they have
    else:  # two plots side by side
        assert len({round(i["top"]) for i in m["images"]}) < len(m["images"])


def test_screenshots_show_the_tables_at_both_widths(report, tmp_path):
    folder = Path(os.environ.get("LPFT_REPORT_SCREENSHOTS") or tmp_path)
    m = measure(tmp_path, report, PHONE)
    phone = screenshot(tmp_path, report, PHONE, 2000, folder / "report_phone.png")
    desktop = screenshot(tmp_path, report, DESKTOP, 1350, folder / "report_desktop.png")
    assert phone.size == (PHONE, 2000) and desktop.size == (DESKTOP, 1350)
    # The first table runs to the phone's right edge, inside its box: that strip is not blank background.
    first = m["tables"][0]
    strip = phone.crop((PHONE - 60, int(first["top"]) + 2, PHONE - 20, int(min(first["bottom"], 2000)) - 2))
    assert len(strip.getcolors(maxcolors=strip.width * strip.height)) > 2


def test_hostile_names_stay_text_in_the_browser(tmp_path):
    evil = "<script>document.body.dataset.pwned=1</script><img src=x onerror='document.body.dataset.pwned=2'>|*`"
    trials = [RunRecord(evil, "bb", "lp", {"C": "auto", "seed": s}, {"C": 1.0},
                        {"id_val": {"accuracy": 0.8}, "id_test": {"accuracy": 0.7 + 0.01 * s},
                         f"ood/{evil}": {"accuracy": 0.5}}, [{"C": 1.0}]) for s in range(3)]
    report = write_report(trials, tmp_path / "evil", title=evil, sweeps=[evil], command=["lpft", evil], db=evil)
    m = measure(tmp_path, report.html, DESKTOP)
    assert m["scripts"] == 0 and len(m["images"]) == 1  # the plot; not the name's <img>
    assert evil in m["headings"][0]
    dom = run_chromium(tmp_path, report.html, "--window-size=1280,900", "--dump-dom")
    assert "pwned" not in re.search(r"<body[^>]*>", dom).group(0)
