"""The report on the monitor's current metric families: excess kurtosis, shadow betas, noise sources, groups."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest

from heavytail.report import Run, load_run, split_key, write_compare_report, write_report
from heavytail.report.charts import KURTOSIS_SHIFT, kurtosis_scale
from heavytail.report.stats import ratio_family, shadow_beta, shadow_ratio_families

LAYERS = ("embed.weight", "blocks.0.mlp.fc.weight", "head.weight")


def _write(path: Path, records: list[dict], meta: dict | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    meta = (
        meta
        if meta is not None
        else {
            "run_name": path.name,
            "model": "GPT",
            "optimizer": "Lion",
            "every": 10,
            "params": [{"name": n, "shape": [8, 8], "numel": 64, "dtype": "float32"} for n in LAYERS],
        }
    )
    (path / "meta.json").write_text(json.dumps(meta))
    lines = [json.dumps({"step": 10 * (i + 1), "wall_time": float(i), "metrics": m}) for i, m in enumerate(records)]
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return path


def _records(n: int = 6, adam: bool = False, probe: bool = True) -> list[dict]:
    out = []
    for c in range(n):
        m: dict = {"loss": 5.0 - 0.1 * c}
        for i, name in enumerate(LAYERS):
            m[f"grad/hill_alpha/{name}"] = 2.5 + i
            m[f"grad/kurtosis/{name}"] = [-1.5, 0.0, 40.0][i]  # excess: flatter than Gaussian, Gaussian, heavy
            m[f"grad/kurtosis_gauss/{name}"] = 0.05
            m[f"noise/hill_alpha/{name}"] = 3.0 + i
            m[f"noise/microbatch_hill_alpha/{name}"] = 2.2 + i
            m[f"noise/microbatch_hill_alpha_se/{name}"] = 0.1
            m[f"shadow999/ratio_max/{name}"] = 5.0 + i
            m[f"shadow95/ratio_max/{name}"] = 3.0 + i
            m[f"shadow999/spike_frac/{name}"] = 0.0
            m[f"grad/norm_preclip/{name}"] = 1.0
            m[f"grad/hill_k/{name}"] = 40.0
            if adam:
                m[f"adam/ratio_max/{name}"] = 4.0 + i
            if probe and c % 2 == 1:
                m[f"probe/hill_alpha/{name}"] = [1.2, 3.3, 3.6][i]
                m[f"probe/hill_alpha_gauss/{name}"] = 3.97
                m[f"probe/stable_alpha/{name}"] = [1.1, 1.9, 2.0][i]
                m[f"probe/moment_slope_p1/{name}"] = 0.5
                m[f"probe/moment_slope_p1.5/{name}"] = 0.6
                m[f"probe/resolved_frac/{name}"] = 0.4
        out.append(m)
    return out


def _section(text: str, section_id: str) -> str:
    start = text.index(f'id="{section_id}"')
    return text[start : text.index("</section>", start)]


def test_split_key_knows_the_new_families_without_meta() -> None:
    for family in (
        "noise/microbatch_hill_alpha",
        "noise/rank_hill_alpha_se",
        "shadow999/ratio_max",
        "shadow95/spike_frac",
        "grad/norm_preclip",
        "grad/hill_k",
        "probe/moment_slope_p1.5",
        "probe/hill_alpha_gauss",
        "adam/memory_steps",
    ):
        assert split_key(f"{family}/enc/layer.0.weight") == (family, "enc/layer.0.weight")
    assert split_key("grad/norm_preclip") == ("grad/norm_preclip", None)  # the global figure


def test_negative_excess_kurtosis_has_a_colour(tmp_path: Path, png_pixels) -> None:
    scale = kurtosis_scale([np.asarray([-1.5, 0.0, 40.0])])
    assert scale.shift == KURTOSIS_SHIFT and scale.lo == 1.0 and scale.hi == 100.0
    colours = {scale.css(v) for v in (-2.0, -1.5, 0.0, 40.0)}
    assert len(colours) == 4 and scale.missing not in colours
    assert scale.pos(-2.0) == 0.0 and scale.pos(97.0) == pytest.approx(1.0)
    text = write_report(_write(tmp_path / "run", _records())).read_text(encoding="utf-8")
    kurt = _section(text, "sec-kurtosis")
    assert "excess kurtosis" in kurt and "Pearson" in kurt
    assert ">−2<" in kurt or ">-2<" in kurt  # the legend starts at the least possible excess kurtosis
    assert "Gaussian 99% (0.05)" in kurt
    # The heatmap's first row (excess -1.5) is coloured, not the grey of a missing value.
    uri = re.search(r'href="data:image/png;base64,([^"]+)"', kurt).group(1)
    pixels = png_pixels(base64.b64decode(uri))
    missing = np.asarray([0xD3, 0xD8, 0xE0])
    assert not np.all(pixels[0, 0] == missing)
    assert len({tuple(pixels[i, 0]) for i in range(3)}) == 3


def test_shadow_families_are_found_by_beta(tmp_path: Path) -> None:
    run = load_run(_write(tmp_path / "lion", _records()))
    assert shadow_ratio_families(run) == ["shadow999/ratio_max", "shadow95/ratio_max"]
    assert ratio_family(run) == "shadow999/ratio_max"
    assert shadow_beta("shadow999/ratio_max") == 0.999 and shadow_beta("shadow95/x") == 0.95
    text = write_report(run).read_text(encoding="utf-8")
    assert 'data-family="shadow999/ratio_max"' in _section(text, "sec-ratio")
    assert 'data-family="shadow95/ratio_max"' in _section(text, "sec-shadow-ratio")
    assert "β₂ = 0.95" in text


def test_adamw_run_shows_its_own_ratio_and_every_shadow(tmp_path: Path) -> None:
    run = load_run(_write(tmp_path / "adamw", _records(adam=True)))
    assert ratio_family(run) == "adam/ratio_max"
    text = write_report(run).read_text(encoding="utf-8")
    assert 'data-family="adam/ratio_max"' in _section(text, "sec-ratio")
    assert 'data-family="shadow999/ratio_max"' in _section(text, "sec-shadow-ratio")
    assert 'data-family="shadow95/ratio_max"' in _section(text, "sec-shadow-ratio-2")


def test_noise_sources_are_shown_when_present(tmp_path: Path) -> None:
    text = write_report(_write(tmp_path / "run", _records())).read_text(encoding="utf-8")
    assert 'data-family="noise/microbatch_hill_alpha"' in _section(text, "sec-noise-microbatch")
    assert 'data-family="probe/hill_alpha"' in _section(text, "sec-noise-probe")
    table = _section(text, "sec-noise-sources")
    for label in ("temporal α", "micro-batch α", "probe α", "probe stable α", "probe slope p=1"):
        assert label in table
    assert "3.97" in table  # the probe's Gaussian reference
    assert "sec-noise-rank" not in text  # not recorded, so no section
    # Without any extra source there is no noise-sources section at all.
    records = [{k: v for k, v in m.items() if not k.startswith(("probe/", "noise/micro"))} for m in _records()]
    plain = write_report(_write(tmp_path / "plain", records)).read_text(encoding="utf-8")
    assert "sec-noise-sources" not in plain and "sec-noise-probe" not in plain


def test_grouped_units_split_on_group_names(tmp_path: Path) -> None:
    meta = {"params": [{"name": "blocks.0.a/b.weight", "numel": 4}], "groups": {"blocks.0/x": ["blocks.0.a/b.weight"]}}
    path = _write(tmp_path / "g", [{"grad/hill_alpha/blocks.0/x": 3.0, "probe/hill_alpha/blocks.0/x": 2.0}], meta)
    run = load_run(path)
    assert run.layers("grad/hill_alpha") == ["blocks.0/x"] and run.layers("probe/hill_alpha") == ["blocks.0/x"]


def test_compare_report_tables_side_by_side(tmp_path: Path) -> None:
    a = _write(tmp_path / "adamw", _records(adam=True))
    b = _write(tmp_path / "lion", _records())
    text = write_compare_report({"adamw": a, "lion": b}, tmp_path / "c.html").read_text(encoding="utf-8")
    tables = _section(text, "sec-family-tables")
    for family in (
        "grad/hill_alpha",
        "probe/hill_alpha",
        "adam/ratio_max",
        "shadow999/ratio_max",
        "shadow95/ratio_max",
    ):
        assert f"data-family='{family}'" in tables
    assert 'data-family="shadow95/ratio_max"' in _section(text, "sec-shadow-ratio-2")
    assert "sec-noise-probe" in text and "sec-noise-microbatch" in text
    assert text.count('data-legend="kurtosis"') == 1


def test_run_object_from_records_handles_new_families(tmp_path: Path) -> None:
    run = Run(path=tmp_path, meta={}, records=[(1, 0.0, {"shadow999/ratio_max/w": 3.0, "grad/hill_alpha/w": 2.0})])
    assert ratio_family(run) == "shadow999/ratio_max"
