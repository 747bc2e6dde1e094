"""The HTML report: one self-contained file, the expected sections, escaping, downsampling, the comparison page."""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
from datetime import datetime, timezone
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from heavytail.report import Run, RunDirError, load_run, write_compare_report, write_report
from heavytail.report.charts import ALPHA_SCALE, json_for_script, png_data_uri
from heavytail.report.html import render_report

SECTIONS = (
    "sec-loss",
    "sec-tail-index",
    "sec-noise-tail-index",
    "sec-kurtosis",
    "sec-ratio",
    "sec-heaviest",
    "sec-alerts",
    "sec-meta",
)
# Attributes through which a page can fetch something.
URL_ATTRIBUTES = {"src", "href", "xlink:href", "srcset", "action", "formaction", "poster", "data", "background", "ping"}


class _Collector(HTMLParser):
    """Tags, attributes and script bodies of a page, as a browser's tokenizer sees them."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"
        if self._in_script:
            self.scripts.append("")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.scripts[-1] += data


def _parse(text: str) -> _Collector:
    parser = _Collector()
    parser.feed(text)
    parser.close()
    return parser


def _data(text: str) -> dict:
    """The embedded JSON blob, parsed as the page's script parses it."""
    parser = _parse(text)
    blobs = [
        body
        for (tag, attrs), body in zip([t for t in parser.tags if t[0] == "script"], parser.scripts, strict=True)
        if attrs.get("type") == "application/json"
    ]
    assert len(blobs) == 1
    return json.loads(blobs[0])


def _at(text: str, ident: str) -> str:
    """The page from the element with id ``ident`` on (attributes may use either quote)."""
    match = re.search(rf"""id=["']{re.escape(ident)}["']""", text)
    assert match is not None, f"no element with id {ident!r}"
    return text[match.start() :]


def _heatmap_values(entry: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(entry["values"]), dtype="<f4").reshape(entry["rows"], entry["cols"])


def assert_self_contained(text: str) -> None:
    """Nothing in the page can reach outside it: no URL but data: and #fragments, no scheme anywhere."""
    lowered = text.lower()
    assert "http://" not in lowered and "https://" not in lowered
    assert "<link" not in lowered and "@import" not in lowered and "<iframe" not in lowered
    assert "url(" not in lowered.replace("url(data:", "")
    for tag, attrs in _parse(text).tags:
        for name, value in attrs.items():
            if name in URL_ATTRIBUTES:
                assert value is not None
                assert value.startswith(("data:", "#")), f"<{tag} {name}={value[:60]!r}> points outside the page"
                assert not value.startswith("//")


# ------------------------------------------------------------------------------------------------ one run


def test_write_report_default_path(run_dir: Path) -> None:
    out = write_report(run_dir)
    assert out == run_dir / "report.html"
    assert out.is_file() and out.stat().st_size > 10_000
    assert not list(run_dir.glob(".report.html.*"))  # the temporary file was renamed


def test_write_report_custom_path_and_run_object(run_dir: Path, tmp_path: Path) -> None:
    out = write_report(load_run(run_dir), tmp_path / "deep" / "r.html")
    assert out == tmp_path / "deep" / "r.html" and out.is_file()


def test_sections_and_charts(run_dir: Path) -> None:
    text = write_report(run_dir).read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    for section in SECTIONS:
        assert _at(text, section)
    assert text.count('class="ht-chart ht-heatmap"') == 4  # tail index, noise, kurtosis, ratio
    assert text.count('class="ht-alert-marker"') == 4  # 2 alerts on the loss chart and on the grad-norm chart
    assert 'data-family="grad/hill_alpha"' in text and 'data-family="adam/ratio_max"' in text
    assert "α &lt; 2: infinite variance" in text  # the legend marks the infinite-variance range
    assert _at(text, "heaviest-table") and _at(text, "alert-table")
    assert "tail_index_drop" in text and "loss_spike" in text
    assert "Not recorded in this run" not in text


def test_content_security_policy_forbids_fetches(run_dir: Path) -> None:
    text = write_report(run_dir).read_text(encoding="utf-8")
    csp = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]+)">', text)
    assert csp is not None
    policy = csp.group(1).replace("&#x27;", "'")
    assert "default-src 'none'" in policy and "img-src data:" in policy
    assert text.index("Content-Security-Policy") < text.index("<style>")  # before anything it governs


def test_self_contained(run_dir: Path) -> None:
    assert_self_contained(write_report(run_dir).read_text(encoding="utf-8"))


def test_alert_marker_tooltip_lists_rule_and_message(run_dir: Path) -> None:
    text = write_report(run_dir).read_text(encoding="utf-8")
    marker = re.search(r'<g class="ht-alert-marker" data-tip="([^"]*)"><title>([^<]*)</title>', text)
    assert marker is not None
    assert "loss_spike (warning): loss 7.9 at step" in marker.group(2) or "tail_index_drop (critical)" in marker.group(
        2
    )


def test_heaviest_table_ranks_the_dipping_layer(run_dir: Path, names) -> None:
    text = write_report(run_dir).read_text(encoding="utf-8")
    table = _at(text, "heaviest-table")
    table = table[: table.index("</table>")]
    assert names.heavy in table
    assert "5 / 50" in table  # the heavy layer's checkpoints under alpha = 2


def test_embedded_data_matches_the_run(run_dir: Path, names) -> None:
    run = load_run(run_dir)
    data = _data(render_report(run))
    tail = next(h for h in data["heatmaps"].values() if h["label"] == "tail index α")
    assert tail["layers"] == list(names.layers)
    layers, steps, values = run.matrix("grad/hill_alpha")
    assert tail["lo"] == steps.tolist()
    np.testing.assert_allclose(_heatmap_values(tail), values.astype(np.float32), equal_nan=True)
    (loss,) = [ln for ln in data["lines"].values() if ln["ylabel"] == "loss"]
    assert len(loss["series"][0]["steps"]) == 50


def test_heatmap_png_has_one_pixel_per_cell(run_dir: Path, png_pixels) -> None:
    text = write_report(run_dir).read_text(encoding="utf-8")
    uri = re.search(r'<image class="ht-cells"[^>]*href="data:image/png;base64,([^"]+)"', text)
    assert uri is not None
    pixels = png_pixels(base64.b64decode(uri.group(1)))
    assert pixels.shape == (6, 50, 3)


def test_downsampling_keeps_the_worst_value(make_run, names) -> None:
    run = load_run(make_run(n_checkpoints=1000, every=1))
    data = _data(render_report(run, max_columns=100))
    tail = next(h for h in data["heatmaps"].values() if h["label"] == "tail index α")
    kurt = next(h for h in data["heatmaps"].values() if h["label"] == "excess kurtosis")
    assert tail["cols"] == 100 and len(tail["lo"]) == len(tail["hi"]) == 100
    assert tail["lo"][0] == 1 and tail["hi"][-1] == 1000
    _, _, alpha = run.matrix("grad/hill_alpha")
    _, _, kurtosis = run.matrix("grad/kurtosis")
    # A column shows its bin's lowest alpha and highest kurtosis, so the dip under 2 survives thinning.
    np.testing.assert_allclose(np.nanmin(_heatmap_values(tail), axis=1), np.nanmin(alpha, axis=1), rtol=1e-6)
    np.testing.assert_allclose(np.nanmax(_heatmap_values(kurt), axis=1), np.nanmax(kurtosis, axis=1), rtol=1e-6)
    assert "1000 checkpoints in 100 columns" in render_report(run, max_columns=100)


def test_many_layers_and_steps(make_run) -> None:
    layers = [f"model.layers.{i}.mlp.w{i % 3}.weight" for i in range(150)]
    run = load_run(make_run(layers=layers, n_checkpoints=300, every=1, with_noise=False))
    text = render_report(run, max_columns=120)
    tail = next(h for h in _data(text)["heatmaps"].values() if h["label"] == "tail index α")
    assert (tail["rows"], tail["cols"]) == (150, 120)
    assert len(text) < 2_000_000
    # Names that would overlap are left out of the axis, but the one that dipped under 2 is always named.
    axis = re.search(r'data-family="grad/hill_alpha".*?</svg>', text, re.S).group(0)
    labelled = re.findall(r'class="mono"[^>]*>([^<]+)<title>', axis)
    assert 10 < len(labelled) < 150
    assert any(label.endswith(layers[3][-20:]) for label in labelled)


def test_missing_families_say_not_recorded(make_run) -> None:
    text = write_report(make_run(with_noise=False, with_adam=False)).read_text(encoding="utf-8")
    for section in ("sec-noise-tail-index", "sec-ratio"):
        body = _at(text, section)
        body = body[: body.index("</section>")]
        assert "Not recorded in this run" in body
        assert "ht-heatmap" not in body
    assert text.count('class="ht-chart ht-heatmap"') == 2


def test_shadow_ratio_stands_in_for_optimizers_without_a_denominator(make_run, names) -> None:
    path = make_run(with_adam=False, optimizer="Lion")
    lines = (path / "metrics.jsonl").read_text().splitlines()
    out = []
    for line in lines:
        rec = json.loads(line)
        rec["metrics"].update({f"shadow/ratio_max/{name}": 4.0 for name in names.layers})
        out.append(json.dumps(rec))
    (path / "metrics.jsonl").write_text("\n".join(out) + "\n")
    text = write_report(path).read_text(encoding="utf-8")
    assert 'data-family="shadow/ratio_max"' in text and "Shadow denominator ratio" in text


def test_run_without_loss_or_alerts(tmp_path: Path) -> None:
    run = Run(
        path=tmp_path, meta={}, records=[(1, 0.0, {"grad/hill_alpha/w": 3.0}), (2, 1.0, {"grad/hill_alpha/w": None})]
    )
    text = write_report(run).read_text(encoding="utf-8")
    assert "no <code>loss</code> values" in text
    assert "No alerts were raised in this run." in text
    assert "meta.json is missing" in text
    assert_self_contained(text)


def test_single_checkpoint_and_all_null_family(tmp_path: Path) -> None:
    run = Run(
        path=tmp_path, meta={}, records=[(7, 0.0, {"loss": 3.0, "grad/hill_alpha/w": None, "grad/kurtosis/w": None})]
    )
    text = write_report(run).read_text(encoding="utf-8")
    assert text.count('class="ht-chart ht-heatmap"') == 2


def test_odd_alerts_and_meta_do_not_break_the_page(tmp_path: Path) -> None:
    meta = {"params": "not a list", "every": "often", "started": "yesterday", "model": {"name": "<GPT>"}}
    alerts = [
        {"rule": "custom", "severity": "fatal", "message": "<x>"},  # no step, unknown severity
        {"step": 2, "rule": "loss_spike", "severity": "info", "message": 42, "value": None},
    ]
    run = Run(path=tmp_path, meta=meta, records=[(1, 0.0, {"loss": 1.0}), (2, 1.0, {"loss": 2.0})], alerts=alerts)
    text = write_report(run).read_text(encoding="utf-8")
    assert "&lt;x&gt;" in text and "sev-other" in text
    assert text.count('class="ht-alert-marker"') == 1  # the alert without a step is listed, not drawn
    assert "&lt;GPT&gt;" in text and "yesterday" in text
    assert_self_contained(text)


def test_diverging_loss_uses_a_log_axis(tmp_path: Path) -> None:
    records = [(i, float(i), {"loss": 3.0 * 10 ** (i / 10)}) for i in range(1, 60)]
    text = write_report(Run(path=tmp_path, meta={}, records=records)).read_text(encoding="utf-8")
    assert "loss (log scale)" in text


def test_long_layer_names_are_shortened_on_the_axis_only(tmp_path: Path) -> None:
    name = "model." + ".".join(f"block{i}" for i in range(20)) + ".weight"
    run = Run(path=tmp_path, meta={}, records=[(1, 0.0, {f"grad/hill_alpha/{name}": 3.0})])
    text = render_report(run)
    assert "…" + name[-39:] in text  # the label keeps the informative end of the name
    assert f"<title>{name}</title>" in text  # the full name is one hover away
    assert name in next(iter(_data(text)["heatmaps"].values()))["layers"]


def test_missing_run_dir_raises(tmp_path: Path) -> None:
    with pytest.raises(RunDirError, match="no such run directory"):
        write_report(tmp_path / "absent")


# ------------------------------------------------------------------------------------------------ escaping


def test_run_strings_are_escaped(evil_run_dir: Path, names) -> None:
    text = write_report(evil_run_dir).read_text(encoding="utf-8")
    parser = _parse(text)
    scripts = [attrs for tag, attrs in parser.tags if tag == "script"]
    assert len(scripts) == 2  # the data blob and the report's own script, nothing injected
    assert [t for t, _ in parser.tags if t in ("img", "iframe", "object", "embed")] == []
    assert "<b>run</b>" not in text
    assert not any(name.startswith("on") for _, attrs in parser.tags for name in attrs)
    assert "<script>alert(1)</script>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "blocks.&quot;&amp;&#x27;.weight" in text  # "&' in a layer name
    assert "&lt;b&gt;run&lt;/b&gt;&quot;&amp;&#x27;" in text  # the run name, in the title and header
    assert text.lower().count("</script") == 2
    assert_self_contained(text)


def test_embedded_json_cannot_close_its_script(evil_run_dir: Path, names) -> None:
    text = render_report(load_run(evil_run_dir))
    data = _data(text)
    layers = next(iter(data["heatmaps"].values()))["layers"]
    assert names.evil in layers and names.quote in layers  # the exact names survive the escaping
    assert "x</script><img src=x onerror=alert(2)>" in layers


def test_json_for_script() -> None:
    payload = {"a": "</script><!-- <script>", "b": "&amp; \u2028 \u2029", "c": [1.5, None]}
    text = json_for_script(payload)
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text) == payload


# ------------------------------------------------------------------------------------------------ pieces


def test_alpha_colour_breaks_at_two() -> None:
    below, above = ALPHA_SCALE.rgb(np.array([1.95, 2.05]))
    assert below[0] > 180 and below[1] < 80  # red
    assert above[1] > 130  # orange-yellow
    assert ALPHA_SCALE.css(float("nan")) == ALPHA_SCALE.missing


def test_png_data_uri_round_trip(png_pixels) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    uri = png_data_uri(rgb)
    assert uri.startswith("data:image/png;base64,")
    np.testing.assert_array_equal(png_pixels(base64.b64decode(uri.split(",", 1)[1])), rgb)


# ------------------------------------------------------------------------------------------------ comparison


def test_compare_report(make_run, tmp_path: Path, names) -> None:
    adamw = make_run("adamw", optimizer="AdamW", seed=0)
    lion = make_run("lion", optimizer="Lion", seed=1, with_adam=False)
    note = 'Same model, data order and seed 0; lr tuned per optimizer <i>"fair"</i> & square.'
    out = write_compare_report(
        {"AdamW": adamw, "Lion": load_run(lion)},
        tmp_path / "compare.html",
        summary={"AdamW": {"lr": 3e-4, "tokens/s": 1200}, "Lion": {"lr": 1e-4}, "data order": "fixed <seed>"},
        note=note,
    )
    text = out.read_text(encoding="utf-8")
    assert_self_contained(text)
    assert "&lt;i&gt;&quot;fair&quot;&lt;/i&gt; &amp; square." in text and '<i>"fair"' not in text
    for section in (
        "sec-comparison",
        "sec-loss",
        "sec-layers",
        "sec-tail-index",
        "sec-ratio",
        "sec-alerts",
        "sec-meta",
    ):
        assert _at(text, section)
    table = _at(text, "summary-table")
    table = table[: table.index("</table>")]
    for figure in ("final loss", "alerts", "median tail index α", "median ratio max", "lr", "tokens/s"):
        assert f"<td>{figure}" in table, figure
    assert "3.00e-04" in table and "1.00e-04" in table
    assert "fixed &lt;seed&gt;" in text  # a flat summary entry: comparison settings
    assert "seed differs" in text  # the consistency checks notice the different seeds
    layer_table = _at(text, "layer-table")
    assert all(name in layer_table for name in names.layers)
    # The same heatmaps for both runs, except AdamW's own ratio, which Lion does not have.
    assert text.count('class="ht-chart ht-heatmap"') == 7
    ratio = _at(text, "sec-ratio")
    assert "Not recorded in this run" in ratio[: ratio.index("</section>")]
    data = _data(text)
    (loss,) = [ln for ln in data["lines"].values() if ln["ylabel"] == "loss"]
    assert [s["label"] for s in loss["series"]] == ["AdamW", "Lion"]


def test_compare_report_shares_colour_scales(make_run, tmp_path: Path) -> None:
    a, b = make_run("a"), make_run("b", seed=3)
    text = write_compare_report({"a": a, "b": b}, tmp_path / "c.html").read_text(encoding="utf-8")
    assert text.count('data-legend="kurtosis"') == 1  # one legend per chart type, shared by the runs


def test_compare_report_needs_runs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="runs is empty"):
        write_compare_report({}, tmp_path / "c.html")


# ------------------------------------------------------------------------------------------------ cards and status


def _card(text: str, ident: str) -> tuple[str, str]:
    """The value and the note of a headline card, unescaped."""
    match = re.search(
        rf'id="{ident}"><div class="k">[^<]*</div><div class="v">([^<]*)</div><div class="n">([^<]*)</div>', text
    )
    assert match is not None, f"no card {ident!r}"
    return html.unescape(match.group(1)), html.unescape(match.group(2))


def _whole(v: float, digits: int) -> str:
    """The report's figure format under 1e5: ``digits`` significant digits, whole numbers written out."""
    text = f"{v:.{digits}g}"
    return f"{v:,.0f}" if "e" in text else text


def test_cards_name_their_key_and_step_on_a_real_run(monitored) -> None:
    records = [json.loads(line) for line in (monitored.adamw / "metrics.jsonl").read_text().splitlines()]
    text = render_report(load_run(monitored.adamw))
    ratios = [
        (v, r["step"], k)
        for r in records
        for k, v in r["metrics"].items()
        if k.startswith("adam/ratio_max/") and v is not None
    ]
    value, step, key = max(ratios)
    median = float(np.median([v for v, _, _ in ratios]))
    assert _card(text, "card-ratio") == (_whole(value, 3), f"{key} at step {step} · median {_whole(median, 3)}")
    losses = [(r["step"], r["metrics"]["loss"]) for r in records]
    low_step, low = min(losses, key=lambda t: t[1])
    assert _card(text, "card-loss") == (
        _whole(losses[-1][1], 4),
        f"loss at step {losses[-1][0]} · lowest {_whole(low, 4)} at step {low_step}",
    )
    assert _card(text, "card-step") == (
        f"{records[-1]['step']}",
        f"step of the last record · {len(records)} checkpoints",
    )
    alpha_steps = [r["step"] for r in records if any(k.startswith("grad/hill_alpha/") for k in r["metrics"])]
    assert _card(text, "card-alpha")[1] == f"grad/hill_alpha, all layers, steps {alpha_steps[0]}–{alpha_steps[-1]}"
    alerts = [json.loads(line) for line in (monitored.adamw / "alerts.jsonl").read_text().splitlines()]
    assert _card(text, "card-alerts")[0] == str(len(alerts))
    assert _card(text, "card-alerts")[1].endswith(f", last at step {max(a['step'] for a in alerts)}")


def test_largest_ratio_card_skips_nulls_or_says_none_yet(tmp_path: Path) -> None:
    records = [
        (10, 0.0, {"loss": 3.0, "adam/ratio_max/a": None, "adam/ratio_max/b": None}),
        (20, 1.0, {"loss": 2.0, "adam/ratio_max/a": 4.0, "adam/ratio_max/b": None}),
        (30, 2.0, {"loss": 2.5, "adam/ratio_max/a": float("nan"), "adam/ratio_max/b": 9.5}),
    ]
    text = render_report(Run(path=tmp_path, meta={}, records=records))
    assert _card(text, "card-ratio") == ("9.5", "adam/ratio_max/b at step 30 · median 6.75")
    warm = render_report(Run(path=tmp_path, meta={}, records=records[:1]))
    assert _card(warm, "card-ratio") == (
        "none yet",
        "adam/ratio_max: null at every checkpoint so far (the optimizer's denominator is warming up)",
    )
    bare = render_report(Run(path=tmp_path, meta={}, records=[(1, 0.0, {"loss": 1.0})]))
    assert _card(bare, "card-ratio") == ("—", "not recorded")


def test_under_two_card_names_the_first_layer_under_two(run_dir: Path, names) -> None:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in records if (r["metrics"][f"grad/hill_alpha/{names.heavy}"] or 9) < 2)
    value = first["metrics"][f"grad/hill_alpha/{names.heavy}"]
    assert _card(render_report(load_run(run_dir)), "card-under2") == (
        f"1 / {len(names.layers)}",
        f"first: grad/hill_alpha/{names.heavy} = {value:.3g} at step {first['step']}",
    )


def test_norm_chart_shows_the_pre_clip_norm_beside_the_post_clip_one(monitored) -> None:
    records = [json.loads(line) for line in (monitored.adamw / "metrics.jsonl").read_text().splitlines()]
    data = _data(render_report(load_run(monitored.adamw)))
    (chart,) = [ln for ln in data["lines"].values() if ln["ylabel"] == "global gradient norm"]
    series = {s["label"]: s for s in chart["series"]}
    assert list(series) == ["grad/norm (after clipping)", "grad/norm_preclip (before clipping)"]
    for label in series:
        key = label.split(" ")[0]
        assert series[label]["steps"] == [r["step"] for r in records]
        assert series[label]["values"] == pytest.approx([r["metrics"][key] for r in records], rel=1e-4)
    # The spike was clipped: before clipping the norm is larger than after at that checkpoint.
    pre, post = series["grad/norm_preclip (before clipping)"]["values"], series["grad/norm (after clipping)"]["values"]
    assert max(p / q for p, q in zip(pre, post)) > 2
    assert "nothing was clipped" not in render_report(load_run(monitored.adamw))
    # Without clipping the two agree, and the page says why only one line shows.
    records = [
        (r["step"], r["wall_time"], {**r["metrics"], "grad/norm_preclip": r["metrics"]["grad/norm"]}) for r in records
    ]
    assert "Here they agree at every checkpoint (the lines overlap): nothing was clipped." in render_report(
        Run(path=monitored.adamw, meta={}, records=records)
    )


def test_incomplete_run_banner(monitored) -> None:
    last = json.loads((monitored.killed / "metrics.jsonl").read_text().splitlines()[-1])
    text = render_report(load_run(monitored.killed))
    banner = re.search(r'<div class="ht-banner" id="run-status" role="status">(.*?)</div>', text).group(1)
    stamp = datetime.fromtimestamp(last["wall_time"], tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    assert html.unescape(re.sub("<[^>]+>", "", banner)) == (
        "Incomplete run: the run is still going or was stopped without closing (killed); last record at step "
        f"{last['step']}, {stamp}. meta.json has no finished time, which the monitor writes when it closes."
    )
    assert 'http-equiv="refresh"' not in text
    done = render_report(load_run(monitored.adamw))
    meta = json.loads((monitored.adamw / "meta.json").read_text())
    finished = datetime.fromtimestamp(meta["finished"], tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    assert 'id="run-status"' not in done
    assert f"<dt>Status</dt><dd>finished at {finished}, final step {meta['final_step']}</dd>" in done


def test_watched_report_reloads_while_running(monitored) -> None:
    text = render_report(load_run(monitored.killed), refresh=1.5)
    assert '<meta http-equiv="refresh" content="2">' in text
    assert "This page reloads every 2 s while <code>heavytail report --watch</code> runs." in text
    # A finished run's page never reloads, and says nothing of it.
    assert 'http-equiv="refresh"' in render_report(load_run(monitored.adamw), refresh=1.5)
    assert_self_contained(text)


def test_title_shows_the_run_name(monitored, tmp_path: Path) -> None:
    text = render_report(load_run(monitored.adamw))
    assert "<title>heavytail report: tiny-adamw</title>" in text and "<h1>tiny-adamw</h1>" in text
    # A run the integrations wrote without a run_name is named after the trainer's output directory.
    meta = json.loads((monitored.adamw / "meta.json").read_text())
    shutil.copytree(monitored.adamw, tmp_path / "my-trainer-run" / "heavytail")
    meta["run_name"] = "heavytail"
    (tmp_path / "my-trainer-run" / "heavytail" / "meta.json").write_text(json.dumps(meta))
    text = render_report(load_run(tmp_path / "my-trainer-run" / "heavytail"))
    assert "<title>heavytail report: my-trainer-run</title>" in text
