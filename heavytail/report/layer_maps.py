"""Sections that draw a per-layer family as a layer x step heatmap: tail index, noise sources, kurtosis, ratios.

On the comparison report each run gets its heatmap, side by side, on colour scales shared by the page.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

from heavytail.report.families import families
from heavytail.report.heatmap import HeatmapSpec, render_heatmap, render_legend
from heavytail.report.rundir import Run
from heavytail.report.scales import ColorScale
from heavytail.report.sections import Context, Part, Section
from heavytail.report.stats import ratio_family, shadow_beta, shadow_ratio_families
from heavytail.report.svg import esc
from heavytail.report.tables import missing

TAIL_INDEX = HeatmapSpec(
    "grad/hill_alpha",
    "sec-tail-index",
    "Gradient tail index α (coordinate tail)",
    "Hill estimate of the tail index of |g| over each layer's gradient entries at each checkpoint "
    "(<code>grad/hill_alpha</code>). Lower α means a heavier tail. <b>Red: α &lt; 2</b>, the entries "
    "behave like draws with infinite variance, which the bounded-variance theory behind AdamW does not "
    "cover; orange: 2 ≤ α &lt; 4, finite variance but infinite kurtosis; blue: α ≥ 4, light tails. "
    "A red bar right of a row marks a layer that went under 2.",
    "tail index α",
    "min",
)
NOISE_TAIL_INDEX = HeatmapSpec(
    "noise/hill_alpha",
    "sec-noise-tail-index",
    "Gradient-noise tail index α",
    "Tail index of the gradient <i>noise</i> (<code>noise/hill_alpha</code>): the distribution over steps "
    "or mini-batches of a coordinate's stochastic gradient minus its mean. This is the tail the "
    "convergence theory speaks about; same colours as above.",
    "noise tail index α",
    "min",
)
KURTOSIS = HeatmapSpec(
    "grad/kurtosis",
    "sec-kurtosis",
    "Gradient excess kurtosis",
    "Sample <i>excess</i> kurtosis of each layer's gradient entries (<code>grad/kurtosis</code>, "
    "m₄/m₂² − 3): 0 for a Gaussian, −2 at the least, large for heavy tails. Coloured on a log scale of "
    "excess + 3 (Pearson's kurtosis), so values under 0 (flatter than a Gaussian) have colours too. When "
    "α &lt; 4 the true kurtosis is infinite and the sample value grows with the number of entries, so read "
    "it next to the Gaussian reference for the same count (<code>grad/kurtosis_gauss</code>, the 0.99 "
    "quantile of a Gaussian sample's excess kurtosis, near 0 for large layers; marked on the legend and in "
    "the table below).",
    "excess kurtosis",
    "max",
)

# Noise sources other than the temporal one, with what each sees.
NOISE_SOURCE_SPECS: tuple[HeatmapSpec, ...] = (
    HeatmapSpec(
        "noise/microbatch_hill_alpha",
        "sec-noise-microbatch",
        "Noise tail index α, micro-batch source",
        "Tail index of the deviations of each micro-batch's gradient from their mean under gradient "
        "accumulation (<code>noise/microbatch_hill_alpha</code>).",
        "noise tail index α",
        "min",
    ),
    HeatmapSpec(
        "noise/rank_hill_alpha",
        "sec-noise-rank",
        "Noise tail index α, per-rank source",
        "Tail index of each data-parallel rank's local gradient minus the all-reduced one "
        "(<code>noise/rank_hill_alpha</code>).",
        "noise tail index α",
        "min",
    ),
    HeatmapSpec(
        "probe/hill_alpha",
        "sec-noise-probe",
        "Noise tail index α, probe",
        "The noise probe (<code>probe/hill_alpha</code>): many mini-batch gradients of one held-out batch at a "
        "checkpoint, weights fixed, noise = a mini-batch gradient minus their mean (Simsekli et al. 2019). Each "
        "coordinate's draws are standardised by their own robust scale, then pooled and read by Hill, as the "
        "streaming sources are (the verdict, light or power, is <code>probe/tail_class</code>). The per-coordinate Hill "
        "is <code>probe/hill_alpha_coord</code>. Same colours as above.",
        "noise tail index α",
        "min",
    ),
)


def ratio_heatmap(ratio: str = "adam/ratio_max") -> HeatmapSpec:
    """The heatmap of one denominator-ratio family: AdamW's own, or a shadow denominator's."""
    return HeatmapSpec(
        ratio,
        "sec-ratio",
        "Denominator ratio (AdamW)" if ratio.startswith("adam/") else _shadow_title(ratio),
        (
            "Largest |g<sub>t</sub>| / (√v̂<sub>t−1</sub> + ε) over each layer's coordinates "
            "(<code>adam/ratio_max</code>): how far a new gradient stands above what the optimizer's "
            "second-moment denominator expects. Large values mean a gradient spike arrives bigger than the "
            "denominator remembers; r² over 5000 (r ≈ 71) is the SPAM spike threshold. Log colour scale."
            if ratio.startswith("adam/")
            else f"The same ratio against a <i>shadow</i> denominator (<code>{esc(ratio)}</code>): an EMA "
            f"of g² with β₂ = {_beta_text(ratio)} kept on sampled coordinates, showing what an AdamW "
            "denominator would have done on this run's gradients, whatever the optimizer. Log colour scale."
        ),
        "ratio max",
        "max",
    )


def heatmap_specs(ratio_family: str | None = None) -> list[HeatmapSpec]:
    """The heatmaps every report has, in order; the ratio's is ``ratio_family``'s (default AdamW's own)."""
    return [TAIL_INDEX, NOISE_TAIL_INDEX, KURTOSIS, ratio_heatmap(ratio_family or "adam/ratio_max")]


def _beta_text(family: str) -> str:
    beta = shadow_beta(family)
    return f"{beta:g}" if math.isfinite(beta) else "AdamW's"


def _shadow_title(family: str) -> str:
    beta = shadow_beta(family)
    return f"Shadow denominator ratio (β₂ = {beta:g})" if math.isfinite(beta) else "Shadow denominator ratio"


def ratio_spec(family: str, section_id: str) -> HeatmapSpec:
    """The heatmap of one denominator-ratio family (AdamW's own or a shadow's) under ``section_id``."""
    return dataclasses.replace(ratio_heatmap(family), section_id=section_id)


def noise_source_specs(runs: Sequence[Run]) -> list[HeatmapSpec]:
    """Heatmaps of the noise sources beyond the temporal one that any of ``runs`` recorded."""
    return [spec for spec in NOISE_SOURCE_SPECS if any(r.layers(spec.family) for r in runs)]


def nav_label(spec: HeatmapSpec) -> str:
    """A heatmap's link in the navigation: its title without the parenthesis, unless that names a beta2."""
    return spec.title if "β₂" in spec.title or "," in spec.title else spec.title.split(" (")[0]


def legend_block(spec: HeatmapSpec, scale: ColorScale, kind: str, gauss: float | None) -> str:
    """The colour legend above a heatmap."""
    return (
        f'<div class="ht-legend-row"><span class="ht-legend-title">colour: {esc(spec.label)}</span>'
        f"{render_legend(scale, kind, gauss=gauss)}</div>"
    )


def heatmap_body(ctx: Context, spec: HeatmapSpec) -> str:
    """The one run's heatmap of ``spec.family`` under its legend, or a line saying the run did not record it."""
    layers, steps, values = ctx.run.matrix(spec.family)
    if not layers:
        return missing(spec.family)
    scale, kind = ctx.scale(spec.family)
    return legend_block(spec, scale, kind, ctx.gauss) + render_heatmap(
        ctx.page, spec, layers, steps, values, scale, max_columns=ctx.max_columns
    )


def grid_body(ctx: Context, spec: HeatmapSpec, spec_of: Callable[[Run], HeatmapSpec] | None = None) -> str:
    """Every run's heatmap side by side, on the page's shared scale; ``spec_of`` picks the heatmap a run shows
    (another family of the same kind, where a run lacks ``spec.family``)."""
    width = 1160 if len(ctx.runs) == 1 else 580
    scale, kind = ctx.scale(spec.family)
    cells = []
    any_layers = False
    for name, run in ctx.runs.items():
        own = spec_of(run) if spec_of is not None else spec
        family = own.family
        layers, steps, values = run.matrix(family)
        inner = (
            render_heatmap(
                ctx.page, own, layers, steps, values, ctx.scale(family)[0], width=width, max_columns=ctx.max_columns
            )
            if layers
            else missing(spec.family)
        )
        any_layers = any_layers or bool(layers)
        optimizer = str(run.meta.get("optimizer") or "")
        label = name + (f" ({optimizer})" if optimizer and optimizer != name else "")
        label += f" · {family}" if family != spec.family else ""
        cells.append(f"<div><h3>{esc(label)}</h3>{inner}</div>")
    legend = legend_block(spec, scale, kind, ctx.gauss) if any_layers else ""
    return legend + f"<div class='ht-grid'>{''.join(cells)}</div>"


def heatmap_section(spec: HeatmapSpec, *, optional: bool = False) -> Section:
    """The section drawing ``spec.family`` as a heatmap (one per run, side by side, on the comparison report).

    ``optional``: left out of a page none of whose runs recorded the family; otherwise the section says so.
    """

    def shown(ctx: Context) -> bool:
        return not optional or any(r.layers(spec.family) for r in ctx.runs.values())

    return Section(
        id=spec.section_id,
        title=spec.title,
        keys=(spec.family,),
        draw=lambda ctx: heatmap_body(ctx, spec) if shown(ctx) else None,
        compare=lambda ctx: grid_body(ctx, spec) if shown(ctx) else None,
        description=spec.description,
        nav=nav_label(spec),
    )


def _part(spec: HeatmapSpec, body: str) -> Part:
    return Part(spec.section_id, nav_label(spec), spec.title, body, spec.description)


def _ratio(ctx: Context) -> list[Part]:
    # The run's own denominator ratio, or the shadow's for an optimizer without a denominator.
    spec = ratio_heatmap(ratio_family(ctx.run) or "adam/ratio_max")
    return [_part(spec, heatmap_body(ctx, spec))]


def _ratio_compare(ctx: Context) -> str:
    spec = ratio_heatmap()

    def spec_of(run: Run) -> HeatmapSpec:
        own = ratio_family(run)
        return spec if run.layers(spec.family) or own is None else ratio_heatmap(own)

    return grid_body(ctx, spec, spec_of)


def _shadow_id(i: int) -> str:
    return f"sec-shadow-ratio{'' if i == 0 else f'-{i + 1}'}"


def _shadows(ctx: Context) -> list[Part]:
    # Every other ratio the run recorded: the shadows next to AdamW's own (to check the shadow against the
    # real one), or the other betas of the shadow.
    own = ratio_family(ctx.run)
    others = [f for f in shadow_ratio_families(ctx.run) if f != own]
    return [
        _part(spec, heatmap_body(ctx, spec)) for spec in (ratio_spec(f, _shadow_id(i)) for i, f in enumerate(others))
    ]


def _shadows_compare(ctx: Context) -> list[Part]:
    shadows: list[str] = []
    for run in ctx.runs.values():
        shadows += [f for f in shadow_ratio_families(run) if f not in shadows]
    return [_part(spec, grid_body(ctx, spec)) for spec in (ratio_spec(f, _shadow_id(i)) for i, f in enumerate(shadows))]


# The ratio families (the optimizer's own and the shadows'), on one shared log colour scale.
_RATIOS = tuple(f.key for f in families() if f.scale == "ratio")

# The sections, in report order: the noise sources beyond the temporal one go right after it.
TAIL_INDEX_SECTION = heatmap_section(TAIL_INDEX)
NOISE_SECTIONS = (
    heatmap_section(NOISE_TAIL_INDEX),
    *(heatmap_section(spec, optional=True) for spec in NOISE_SOURCE_SPECS),
)
KURTOSIS_SECTION = heatmap_section(KURTOSIS)
RATIO_SECTION = Section(
    id="sec-ratio",
    title=ratio_heatmap().title,
    keys=_RATIOS,
    draw=_ratio,
    compare=_ratio_compare,
    description=ratio_heatmap().description,
    nav=nav_label(ratio_heatmap()),
)
SHADOW_RATIO_SECTION = Section(
    id="sec-shadow-ratio",
    title="Shadow denominator ratio",
    keys=tuple(key for key in _RATIOS if key != ratio_heatmap().family),
    draw=_shadows,
    compare=_shadows_compare,
)
