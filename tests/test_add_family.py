"""Adding a statistic family, done as docs/architecture.md says: the page's example family, run as written.

The example is read from the page itself, registered with one ``REGISTRY`` line and switched on by one config
field; the monitor is not touched. Its figure is checked against a float64 NumPy recomputation, its slots go
through the packer and ``group_by`` like every built-in family's, and the built-in families' report sections
exist in the report.
"""

from __future__ import annotations

import dataclasses
import re
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import heavytail
import heavytail.report.contents  # noqa: F401 (registers the built-in sections)
from heavytail import families
from heavytail.config import MonitorConfig
from heavytail.report import families as report_families
from heavytail.report import sections
from heavytail.report.html import render_report
from heavytail.report.rundir import load_run
from tests.conftest import TinyNet, read_records, tiny_batch

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def _block(first_line: str) -> str:
    blocks = re.findall(r"```python\n(" + re.escape(first_line) + r".*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 1, f"docs/architecture.md lost its example block {first_line!r}"
    return blocks[0]


def _example_module() -> types.ModuleType:
    module = types.ModuleType("mean_abs_example")
    exec(compile(_block("# heavytail/families/mean_abs.py\n"), str(DOC), "exec"), module.__dict__)
    return module


def _register_example_section(monkeypatch) -> None:
    """The page's report block, run against copies of the report's registries (restored after the test)."""
    monkeypatch.setattr(sections, "SECTIONS", list(sections.SECTIONS))
    monkeypatch.setattr(report_families, "_registered", list(report_families._registered))
    monkeypatch.setattr(report_families, "_longest_first", report_families._longest_first)
    exec(compile(_block("# heavytail/report/contents.py"), str(DOC), "exec"), {})


@dataclasses.dataclass
class ExampleConfig(MonitorConfig):
    track_mean_abs: bool = False
    """The example family's one config field."""


@pytest.mark.parametrize("group_by", [None, r"fc\d"])
def test_the_documented_example_family_records_its_figure_with_no_monitor_change(tmp_path, monkeypatch, group_by):
    example = _example_module()
    monkeypatch.setitem(families.REGISTRY, "mean_abs", example.MeanAbs)  # the one registry line
    _register_example_section(monkeypatch)
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    config = ExampleConfig(log_dir=str(tmp_path), every=4, group_by=group_by, track_mean_abs=True)
    mon = heavytail.Monitor(model, opt, config=config)
    index = dict(zip(mon.layout.names, mon.layout.sample_index.numpy()))
    expected: dict[str, list[float]] = {}
    for step in range(8):
        x, y = tiny_batch(step)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        for name, p in model.named_parameters():
            entries = p.grad.double().numpy().reshape(-1)[index[name]]  # the tensor's sampled coordinates
            expected.setdefault(name, []).append(float(np.abs(entries).mean()))
        opt.step()
    mon.close()
    records = read_records(tmp_path)
    assert [r["step"] for r in records] == [4, 8]
    last = records[-1]["metrics"]
    if group_by is None:
        for name, values in expected.items():
            assert last[f"grad/mean_abs/{name}"] == pytest.approx(np.mean(values[4:]), rel=1e-5)
    else:
        # the slot's "sum" unit merge adds the tensors' (sum, steps) rows: the unit's mean over its tensors
        for unit in ("fc1", "fc2"):
            members = [n for n in expected if n.startswith(unit)]
            want = np.mean([v for n in members for v in expected[n][4:]])
            assert last[f"grad/mean_abs/{unit}"] == pytest.approx(want, rel=1e-5)
    state = mon.state_dict()
    assert "mean_abs" in state["families"], "the new family's state is in state_dict without a monitor change"
    ids = {s.id for s in sections.SECTIONS}
    assert set(example.MeanAbs.report_sections) <= ids
    page = render_report(load_run(tmp_path))
    assert 'id="sec-mean-abs"' in page and "Mean absolute gradient entry" in page
    for unit in ("fc1", "fc2") if group_by else ("fc1.weight", "fc2.bias"):
        assert unit in page


def test_a_family_stays_out_until_its_config_field_turns_it_on(tmp_path, monkeypatch):
    example = _example_module()
    monkeypatch.setitem(families.REGISTRY, "mean_abs", example.MeanAbs)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mon = heavytail.Monitor(model, opt, config=ExampleConfig(log_dir=str(tmp_path), every=2))
    for step in range(2):
        x, y = tiny_batch(step)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    mon.close()
    assert not any(k.startswith("grad/mean_abs/") for k in read_records(tmp_path)[-1]["metrics"])
    assert "mean_abs" not in mon.state_dict()["families"]


def test_every_family_names_report_sections_that_exist():
    ids = {s.id for s in sections.SECTIONS}
    for name, cls in families.REGISTRY.items():
        for section in cls.report_sections:
            assert section in ids, f"family {name!r} names report section {section!r}, not in the report: {ids}"
    drawn = {s for cls in families.REGISTRY.values() for s in cls.report_sections}
    assert {"sec-tail-index", "sec-kurtosis", "sec-ratio", "sec-loss", "sec-noise-tail-index"} <= drawn
