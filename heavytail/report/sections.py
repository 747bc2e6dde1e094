"""Report sections as declarations: the keys a section draws, its title and draw functions, in a registry.

A statistic family adds its section to every report with one declaration::

    register_section(Section(id="sec-lion-flips", title="Lion sign flips", keys=("lion/sign_flip_frac",),
                             draw=draw_flips, compare=compare_flips), before="sec-heaviest")

``draw`` (the one-run report) and ``compare`` (the comparison report) take the page's :class:`Context` and
return the section's body (HTML), or Parts (:class:`Part`) for a section drawn several times or under another
title, or None to leave the section out of this page. A family drawn as a layer x step heatmap needs no draw
function: ``register_section(heatmap_section(HeatmapSpec(...)))`` (:mod:`heavytail.report.layer_maps`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Union

import numpy as np

from heavytail.report.families import Family, families, register_family
from heavytail.report.page import section_html
from heavytail.report.rundir import Run
from heavytail.report.scales import ALPHA_SCALE, ColorScale, decade_hi, kurtosis_scale, log_scale, magnitude_scale
from heavytail.report.stats import RunSummary, all_values, shadow_ratio_families, summarize
from heavytail.report.svg import ChartData


class Part(NamedTuple):
    """One drawn section of a page."""

    id: str
    nav: str
    """The section's link in the page's navigation."""
    title: str
    body: str
    """HTML."""
    description: str = ""
    """Trusted HTML under the title (written in code, never taken from a run)."""


@dataclass
class Context:
    """What a section draws from: the page's runs, its chart data, and colour scales shared by its runs."""

    runs: dict[str, Run]
    """The runs by label, in page order; the one-run report has one."""
    page: ChartData
    compare: bool
    """True on the comparison report."""
    max_columns: int
    """The most step columns a heatmap shows."""
    summary: Mapping[str, Any] | None = None
    """The comparison's added figures (``{label: {figure: value}}`` and settings), if any."""
    note: str | None = None
    """The comparison's note on how it was made fair, if any."""
    scales: dict[str, tuple[ColorScale, str]] = field(init=False)
    """Colour scale and legend kind by family, shared by every run on the page."""
    gauss: float | None = field(init=False)
    """The median Gaussian reference of excess kurtosis (``grad/kurtosis_gauss``), marked on its legend."""
    summaries: dict[str, RunSummary] = field(init=False)
    """Each run's headline figures, by label."""

    def __post_init__(self) -> None:
        self.summaries = {name: summarize(run) for name, run in self.runs.items()}
        self.scales = page_scales(list(self.runs.values()))
        self.gauss = gauss_reference(list(self.runs.values()))

    @property
    def run(self) -> Run:
        """The page's first run: the one run of a one-run report."""
        return next(iter(self.runs.values()))

    def scale(self, family_key: str) -> tuple[ColorScale, str]:
        """The colour scale and legend kind of a family's heatmap (the tail index's when it has none)."""
        return self.scales.get(family_key, (ALPHA_SCALE, "alpha"))


Drawn = Union[str, Iterable[Part], None]
Draw = Callable[[Context], Drawn]


@dataclass(frozen=True)
class Section:
    """A section of the report, declared by the statistic family whose keys it draws."""

    id: str
    """The element id (``sec-...``), unique: the section's name in :data:`SECTIONS`."""
    title: str
    keys: tuple[str, ...]
    """The metric keys it draws: per-layer families (``grad/hill_alpha``) or global keys (``loss``)."""
    draw: Draw | None = None
    """The one-run report's section: its body, Parts, or None to leave it out; None: not in that report."""
    compare: Draw | None = None
    """The comparison report's section, the same way."""
    description: str = ""
    """Trusted HTML under the title."""
    nav: str = ""
    """The link text in the page's navigation ("" for the title)."""

    def part(self, body: str) -> Part:
        """This section with ``body``."""
        return Part(self.id, self.nav or self.title, self.title, body, self.description)


SECTIONS: list[Section] = []
"""Every section, in report order (the built-in ones are registered by :mod:`heavytail.report.contents`)."""


def register_section(section: Section, *, before: str | None = None, after: str | None = None) -> Section:
    """Add ``section`` to :data:`SECTIONS`: before or after the section of that id, else at the end.

    A per-layer key it draws that no family lists yet becomes known (:func:`~heavytail.report.families.
    register_family`), so a run without parameter names in its meta.json still splits it. Returns ``section``.
    """
    if any(s.id == section.id for s in SECTIONS):
        raise ValueError(f"register_section: a section with id {section.id!r} is already registered")
    if before is not None and after is not None:
        raise ValueError("register_section: give before or after, not both")
    anchor = before if before is not None else after
    at = len(SECTIONS)
    if anchor is not None:
        ids = [s.id for s in SECTIONS]
        if anchor not in ids:
            raise ValueError(f"register_section: no section {anchor!r} to place {section.id!r} by; ids: {ids}")
        at = ids.index(anchor) + (after is not None)
    for key in section.keys:
        if "/" in key:
            register_family(Family(key))  # a known key is left as it is
    SECTIONS.insert(at, section)
    return section


def draw_sections(ctx: Context) -> tuple[list[tuple[str, str]], list[str]]:
    """The page's navigation ``(id, label)`` and its sections' HTML, every registered section in order."""
    nav: list[tuple[str, str]] = []
    body: list[str] = []
    for section in SECTIONS:
        draw = section.compare if ctx.compare else section.draw
        drawn = draw(ctx) if draw is not None else None
        if drawn is None:
            continue
        for part in [section.part(drawn)] if isinstance(drawn, str) else drawn:
            nav.append((part.id, part.nav))
            body.append(section_html(part.id, part.title, part.body, part.description))
    return nav, body


def page_scales(runs: list[Run]) -> dict[str, tuple[ColorScale, str]]:
    """Colour scales shared by every run on a page, by family (so compared runs read on one scale)."""
    out: dict[str, tuple[ColorScale, str]] = {}
    ratios: set[str] = {f for r in runs for f in shadow_ratio_families(r)}
    for f in families():
        if f.scale == "alpha":
            out[f.key] = (ALPHA_SCALE, "alpha")
        elif f.scale == "kurtosis":
            out[f.key] = (kurtosis_scale([r.matrix(f.key)[2] for r in runs]), "kurtosis")
        elif f.scale == "ratio":
            ratios.add(f.key)
        elif f.scale == "magnitude":
            out[f.key] = (magnitude_scale([r.matrix(f.key)[2] for r in runs]), "magnitude")
    ratio_scale = log_scale("ratio", 1.0, decade_hi([r.matrix(f)[2] for r in runs for f in ratios], 100.0))
    for key in ratios:
        out[key] = (ratio_scale, "ratio")
    return out


def gauss_reference(runs: list[Run]) -> float | None:
    """The median of ``grad/kurtosis_gauss`` over the runs, or None where none recorded it."""
    vals = np.concatenate([all_values(r, "grad/kurtosis_gauss") for r in runs] or [np.zeros(0)])
    return float(np.median(vals)) if vals.size else None
