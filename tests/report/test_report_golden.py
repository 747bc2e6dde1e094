"""Golden reports: the HTML of one-run and comparison reports of small runs, compared with the saved ones.

The runs are the golden-record scenarios of ``tests/test_golden_records.py`` (AdamW with accumulation and
clipping, Lion with grouped units, Muon, SGD with the noise probe, an injected loss spike with its alerts and
flight records), one of them made to look killed (the watch banner), and synthetic runs in the run-directory
format (one long enough to be downsampled, one without meta.json, so keys split on the known families). What
depends on the time, the machine or the place (timestamps, durations, versions, the temporary directory) is
masked; the rest of the page must stay byte-equal.

The monitored runs' directories are saved too (``golden/runs.tar.gz``, the place they were written in replaced
by ``@ROOT@``), so that these pages test the report alone: a change of what the monitor writes is pinned by
``tests/test_golden_records.py``, not here. The saved pages are ``golden/reports.json`` (the sha256 of each
masked page) and the masked page of one report, ``golden/report_adamw_spike.html``, to diff against. A
deliberate change of the report regenerates them (and the runs, from the monitor as it is then) with
``HEAVYTAIL_REGEN_GOLDEN=1 pytest tests/report/test_report_golden.py``, and says why in its commit.
"""

from __future__ import annotations

import difflib
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import warnings
from pathlib import Path
from typing import Callable

import pytest
import torch

from heavytail.report import load_run, render_compare_report, render_report
from tests.report.conftest import make_run_dir, strip_finished
from tests.test_golden_records import SCENARIOS, _run

GOLDEN = Path(__file__).parent / "golden"
HASHES = GOLDEN / "reports.json"
RUNS = GOLDEN / "runs.tar.gz"
PLACE = b"@ROOT@"  # stands for the folder the runs are in, in the saved run directories
DIFFED = "adamw_spike"  # the report whose masked page is saved in full, for a readable diff
REGEN = os.environ.get("HEAVYTAIL_REGEN_GOLDEN") == "1"
MONITORED = ("adamw_accumulate_clip", "lion_grouped", "muon", "sgd_probe", "adamw_spike")


def _save_runs(tmp: Path) -> None:
    """Run the monitored scenarios in ``tmp`` and save their directories to :data:`RUNS`."""
    # float32 sums depend on the thread count, and the page embeds the values' float32 bits.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name in MONITORED:
            _run(name, tmp / name, **SCENARIOS[name])
    finally:
        torch.set_num_threads(threads)
    with tarfile.open(RUNS, "w:gz") as tar:
        for path in sorted(p for name in MONITORED for p in (tmp / name).rglob("*") if p.is_file()):
            data = path.read_bytes().replace(str(tmp).encode(), PLACE)
            info = tarfile.TarInfo(path.relative_to(tmp).as_posix())
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _load_runs(root: Path) -> None:
    with tarfile.open(RUNS, "r:gz") as tar:
        for member in tar.getmembers():
            data = tar.extractfile(member).read().replace(PLACE, str(root).encode())
            (root / member.name).parent.mkdir(parents=True, exist_ok=True)
            (root / member.name).write_bytes(data)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run directories: the saved monitored runs, a killed copy of one, and synthetic ones."""
    root = tmp_path_factory.mktemp("golden_reports")
    if REGEN:
        _save_runs(tmp_path_factory.mktemp("monitored_runs"))
    _load_runs(root)
    strip_finished(Path(shutil.copytree(root / "adamw_spike", root / "killed")))
    make_run_dir(root / "synthetic_long", n_checkpoints=700, seed=3, run_name="synthetic-long")
    make_run_dir(root / "synthetic_no_meta", with_meta=False, n_checkpoints=30, seed=4)
    return root


def _load(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # meta.json missing: the report says so itself
        return load_run(path)


CASES: dict[str, Callable[[Path], str]] = {
    **{name: (lambda root, name=name: render_report(_load(root / name))) for name in MONITORED},
    "killed_watch": lambda root: render_report(_load(root / "killed"), refresh=2.5),
    "synthetic_long": lambda root: render_report(_load(root / "synthetic_long"), max_columns=120),
    "synthetic_no_meta": lambda root: render_report(_load(root / "synthetic_no_meta")),
    "compare_adamw_sgd": lambda root: render_compare_report(
        {"AdamW": root / "adamw_accumulate_clip", "SGD": _load(root / "sgd_probe")},
        summary={"AdamW": {"tokens/s": 1234.5, "note": "fast"}, "SGD": {"tokens/s": 987}, "seed": 0, "budget": "60"},
        note="Same model, data order and seed; only the optimizer differs.",
        max_columns=4,
    ),
    "compare_spike_lion_muon": lambda root: render_compare_report(
        {"spike": _load(root / "adamw_spike"), "Lion": _load(root / "lion_grouped"), "Muon": _load(root / "muon")}
    ),
    "compare_one": lambda root: render_compare_report({"Muon": _load(root / "muon")}),
}


def mask(html: str, root: Path) -> str:
    """The page with what depends on the time, the machine or the place replaced by a fixed word."""
    html = html.replace(str(root), "<ROOT>")
    html = re.sub(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}(:\d{2})? UTC", "<TIME>", html)
    html = re.sub(r"(<dt>Duration</dt><dd>)[^<]*", r"\1<DURATION>", html)
    html = re.sub(r"(<dt>torch / heavytail</dt><dd>)[^<]*", r"\1<VERSIONS>", html)
    return re.sub(r"<tr><td>wall time</td>.*?</tr>", "<tr><td>wall time</td><MASKED></tr>", html)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@pytest.fixture(scope="module")
def pages(root: Path) -> dict[str, str]:
    got = {name: mask(draw(root), root) for name, draw in CASES.items()}
    if REGEN:
        GOLDEN.mkdir(exist_ok=True)
        HASHES.write_text(json.dumps({n: _sha(p) for n, p in got.items()}, indent=1, sort_keys=True) + "\n")
        (GOLDEN / f"report_{DIFFED}.html").write_text(got[DIFFED], encoding="utf-8")
    return got


def test_masking_leaves_nothing_of_the_place_or_the_time(pages: dict[str, str], root: Path) -> None:
    for name, page in pages.items():
        assert str(root) not in page and "/tmp/" not in page, name
        assert torch.__version__ not in page, name
        assert not re.search(r"\b20\d\d-\d\d-\d\d\b", page), name
    # The masked parts are there to be masked: a page that lost them would pass for the wrong reason.
    assert pages[DIFFED].count("<ROOT>") >= 2 and "<DURATION>" in pages[DIFFED] and "<VERSIONS>" in pages[DIFFED]
    assert "<MASKED>" in pages["compare_adamw_sgd"]


def test_golden_files_stay_small() -> None:
    assert sum(p.stat().st_size for p in GOLDEN.iterdir()) < 250_000


@pytest.mark.parametrize("name", sorted(CASES))
def test_report_equals_the_golden_page(name: str, pages: dict[str, str], tmp_path: Path) -> None:
    saved = json.loads(HASHES.read_text())
    page = pages[name]
    if name == DIFFED:
        full = (GOLDEN / f"report_{DIFFED}.html").read_text(encoding="utf-8")
        if page != full:
            diff = difflib.unified_diff(full.splitlines(), page.splitlines(), "golden", "now", lineterm="", n=1)
            pytest.fail("the page differs from the golden one:\n" + "\n".join(list(diff)[:80]))
    if _sha(page) != saved[name]:
        out = tmp_path / f"report_{name}.html"
        out.write_text(page, encoding="utf-8")
        pytest.fail(f"{name}: the masked page differs from the golden one (sha256); it is in {out}")
