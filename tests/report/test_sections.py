"""Report sections: a family's section added with one declaration, placed, drawn in both reports, or left out."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest

from heavytail.report import Run, render_compare_report, render_report, split_key
from heavytail.report import families as families_module
from heavytail.report import sections as sections_module
from heavytail.report.families import KNOWN_FAMILIES, families
from heavytail.report.heatmap import HeatmapSpec
from heavytail.report.layer_maps import heatmap_section
from heavytail.report.sections import SECTIONS, Context, Section, register_section

LAYERS = ("fc1.weight", "fc2.weight")
UPDATE_ALPHA = np.array([[3.5, 1.75, 2.5], [4.25, 6.0, 2.125]])  # layer x checkpoint


@pytest.fixture(autouse=True)
def registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test registers into copies of the section and family registries, put back after it."""
    monkeypatch.setattr(sections_module, "SECTIONS", list(sections_module.SECTIONS))
    monkeypatch.setattr(families_module, "_registered", list(families_module._registered))
    monkeypatch.setattr(families_module, "_longest_first", families_module._longest_first)


def _run(path: Path, *, updates: bool) -> Run:
    """A run in memory: a tail index per layer, and the tail index of its updates when ``updates``."""
    records = []
    for j, step in enumerate((10, 20, 30)):
        metrics = {"loss": 2.0 - 0.1 * j}
        for i, layer in enumerate(LAYERS):
            metrics[f"grad/hill_alpha/{layer}"] = 3.0 + i
            if updates:
                metrics[f"update/hill_alpha/{layer}"] = float(UPDATE_ALPHA[i, j])
        records.append((step, 1.0e9 + step, metrics))
    meta = {"run_name": path.name, "optimizer": "Lion" if updates else "SGD", "params": [{"name": n} for n in LAYERS]}
    return Run(path=path, meta=meta, records=records)


# A new family's heatmap, as docs/architecture.md (the report package) declares it.
UPDATE_SPEC = HeatmapSpec(
    "update/hill_alpha",
    "sec-update-tail-index",
    "Update tail index α",
    "Hill estimate of the tail index of each layer's parameter update (<code>update/hill_alpha</code>).",
    label="update tail index α",
    worst="min",
)


def _section_ids(page: str) -> list[str]:
    return re.findall(r'<section class="ht-sec" id="([^"]+)"', page)


def _nav(page: str) -> list[str]:
    nav = re.search(r'<nav class="ht-nav">(.*?)</nav>', page).group(1)
    return re.findall(r'href="#([^"]+)"', nav)


def _heatmap_values(page: str, family: str) -> np.ndarray:
    chart = re.search(rf'data-chart="(hm\d+)" data-family="{re.escape(family)}"', page).group(1)
    data = json.loads(re.search(r'<script type="application/json" id="ht-data">(.*?)</script>', page).group(1))
    hm = data["heatmaps"][chart]
    values = np.frombuffer(base64.b64decode(hm["values"]), dtype="<f4")
    return values.reshape(hm["rows"], hm["cols"])


def test_one_declaration_adds_a_heatmap_section_to_both_reports(tmp_path: Path) -> None:
    register_section(heatmap_section(UPDATE_SPEC, optional=True), before="sec-heaviest")
    lion, sgd = _run(tmp_path / "lion", updates=True), _run(tmp_path / "sgd", updates=False)

    page = render_report(lion)
    ids = _section_ids(page)
    assert ids.index("sec-update-tail-index") == ids.index("sec-heaviest") - 1
    assert _nav(page) == ids  # every section has its link, in the same order
    assert "<h2>Update tail index α</h2>" in page and "(<code>update/hill_alpha</code>)" in page
    np.testing.assert_array_equal(_heatmap_values(page, "update/hill_alpha"), UPDATE_ALPHA.astype(np.float32))
    # On the tail index's colours (the default), with its bar for the layer that went under 2.
    assert page.count('class="ht-under"') == 1 and "fc1.weight: α under 2 at 1 of 3 checkpoints" in page

    assert "sec-update-tail-index" not in _section_ids(render_report(sgd))  # optional: left out where not recorded

    both = render_compare_report({"Lion": lion, "SGD": sgd})
    body = re.search(r'<section class="ht-sec" id="sec-update-tail-index">(.*?)</section>', both, re.S).group(1)
    assert "<h3>Lion</h3>" in body and "<h3>SGD</h3>" in body
    assert "Not recorded in this run: metrics.jsonl has no <code>update/hill_alpha/&lt;layer&gt;</code>" in body
    assert _section_ids(both).index("sec-update-tail-index") == _section_ids(both).index("sec-alerts") - 1


def test_a_draw_function_gives_the_body_or_leaves_the_section_out(tmp_path: Path) -> None:
    seen: list[Context] = []

    def draw(ctx: Context) -> str | None:
        seen.append(ctx)
        final = ctx.run.final("loss")
        return f"<p id='final-loss'>{final:.2f}</p>" if final < 1.9 else None

    section = Section(id="sec-final", title="Final loss", keys=("loss",), draw=draw, nav="Final")
    assert register_section(section, after="sec-loss") is section
    page = render_report(_run(tmp_path / "lion", updates=True))
    assert _section_ids(page)[:2] == ["sec-loss", "sec-final"] and _nav(page)[:2] == ["sec-loss", "sec-final"]
    assert '<a href="#sec-final">Final</a>' in page and "<p id='final-loss'>1.80</p>" in page
    assert not seen[0].compare and seen[0].summaries["lion"].checkpoints == 3
    # No compare function: not on the comparison report.
    assert "sec-final" not in _section_ids(render_compare_report({"a": _run(tmp_path / "a", updates=True)}))

    short = Run(path=tmp_path / "short", meta={}, records=[(1, 0.0, {"loss": 3.0})])
    assert "sec-final" not in _section_ids(render_report(short))  # draw returned None


def test_register_section_checks_its_place_and_id() -> None:
    section = Section(id="sec-x", title="X", keys=(), draw=lambda ctx: "")
    with pytest.raises(ValueError, match="no section 'sec-nowhere' to place 'sec-x' by"):
        register_section(section, before="sec-nowhere")
    with pytest.raises(ValueError, match="already registered"):
        register_section(Section(id="sec-loss", title="Loss", keys=("loss",), draw=lambda ctx: ""))
    with pytest.raises(ValueError, match="before or after, not both"):
        register_section(section, before="sec-loss", after="sec-meta")
    register_section(section)
    assert SECTIONS is not sections_module.SECTIONS  # the fixture's copy took the registration
    assert sections_module.SECTIONS[-1] is section


def test_a_sections_new_family_is_known_to_split_key() -> None:
    key = "muon/sv/cond/fc1.weight"  # a family of three parts: without meta.json's names it splits after two
    assert split_key(key) == ("muon/sv", "cond/fc1.weight")
    register_section(Section(id="sec-sv", title="Singular values", keys=("muon/sv/cond", "loss"), draw=None))
    assert split_key(key) == ("muon/sv/cond", "fc1.weight")
    assert [f.key for f in families()][: len(KNOWN_FAMILIES)] == list(KNOWN_FAMILIES)
    assert families()[-1].key == "muon/sv/cond" and "loss" not in {f.key for f in families()}


def test_built_in_sections_declare_known_keys_only() -> None:
    known = {f.key for f in families()} | {"loss"}
    for section in SECTIONS:
        assert set(section.keys) <= known, (section.id, set(section.keys) - known)
    assert [s.id for s in SECTIONS][:2] == ["sec-comparison", "sec-loss"]
    assert [s.id for s in SECTIONS][-2:] == ["sec-alerts", "sec-meta"]
