"""The per-layer metric families the report knows, listed once: their keys and what the report's tables call them."""

from __future__ import annotations

from typing import NamedTuple


class Family(NamedTuple):
    """A per-layer metric family: the keys ``<key>/<parameter name>`` of one figure."""

    key: str
    """The family's key, at least two slash-separated parts (``grad/hill_alpha``)."""
    table: str = ""
    """The title of its side-by-side table of per-layer medians in the comparison report; "" for none."""
    column: str = ""
    """Its column in the one-run report's table of noise sources; "" for none."""
    scale: str = ""
    """The colour scale of its heatmap: ``alpha``, ``kurtosis``, ``ratio`` or ``magnitude`` (a log scale over the
    page's own values, no threshold marked; "" draws none: tail-index colours)."""


# In the order the report shows them (tables and columns keep it), grouped by what they measure. A shadow
# denominator is tagged by its beta2 (0.999 -> shadow999, 0.95 -> shadow95); plain ``shadow/`` is the older tag.
FAMILIES: tuple[Family, ...] = (
    # The coordinate tail: each layer's gradient entries at one step.
    Family("grad/hill_alpha", table="Gradient tail index α (coordinate tail)", scale="alpha"),
    Family("grad/hill_alpha_se"),
    Family("grad/hill_k"),
    # The noise tail, by source: temporal, micro-batch, per rank, the probe.
    Family("noise/hill_alpha", table="Noise tail index α (temporal)", column="temporal α", scale="alpha"),
    Family("noise/hill_alpha_se"),
    Family("noise/kurtosis"),
    Family("noise/kurtosis_gauss"),
    Family("noise/tail_class"),
    Family("noise/active_frac"),
    Family(
        "noise/microbatch_hill_alpha",
        table="Noise tail index α (micro-batch)",
        column="micro-batch α",
        scale="alpha",
    ),
    Family("noise/microbatch_hill_alpha_se"),
    Family("noise/microbatch_kurtosis"),
    Family("noise/microbatch_tail_class"),
    Family("noise/microbatch_active_frac"),
    Family("noise/rank_hill_alpha", table="Noise tail index α (rank)", column="rank α", scale="alpha"),
    Family("noise/rank_hill_alpha_se"),
    Family("noise/rank_kurtosis"),
    Family("noise/rank_tail_class"),
    Family("noise/rank_active_frac"),
    Family("probe/hill_alpha", table="Noise tail index α (probe, Hill)", column="probe α", scale="alpha"),
    Family("probe/hill_alpha_se"),
    Family("probe/hill_alpha_gauss"),
    Family("probe/tail_class"),
    Family("probe/active_frac"),
    Family("probe/hill_alpha_2x", column="probe α, 2× batch"),
    Family("probe/tail_class_2x"),
    Family("probe/hill_alpha_coord", column="probe α per coord."),
    Family("probe/micro_batches"),
    Family("probe/batch_size"),
    Family("probe/stable_alpha", table="Noise stable index α (probe; 2 = Gaussian)", column="probe stable α"),
    Family("probe/kurtosis", column="probe excess kurtosis"),
    Family(
        "probe/moment_slope_p1",
        table="Probe: slope of log E|ξ| against log |∇f|",
        column="probe slope p=1",
    ),
    Family("probe/moment_intercept_p1"),
    Family("probe/moment_slope_p1.5", column="probe slope p=1.5"),
    Family("probe/moment_intercept_p1.5"),
    Family("probe/resolved_frac", column="probe resolved"),
    Family("probe/grad_norm"),
    # The rest of each layer's gradient.
    Family("grad/kurtosis", table="Gradient excess kurtosis", scale="kurtosis"),
    Family("grad/kurtosis_gauss"),
    Family("grad/norm"),
    Family("grad/norm_preclip"),
    Family("grad/max"),
    Family("grad/nonfinite_frac"),
    # Denominators: the optimizer's own (adam/), and the shadow EMAs of g^2 every run keeps.
    Family("adam/ratio_max", table="Denominator ratio max (the optimizer's own)", scale="ratio"),
    Family("shadow999/ratio_max", table="Shadow denominator ratio max (β₂ = 0.999)", scale="ratio"),
    Family("shadow95/ratio_max", table="Shadow denominator ratio max (β₂ = 0.95)", scale="ratio"),
    Family("shadow/ratio_max", scale="ratio"),
    Family("adam/ratio_p99"),
    Family("shadow/ratio_p99"),
    Family("adam/spike_frac", table="Spike fraction (the optimizer's own denominator)"),
    Family("shadow999/spike_frac", table="Spike fraction (shadow, β₂ = 0.999)"),
    Family("shadow95/spike_frac", table="Spike fraction (shadow, β₂ = 0.95)"),
    Family("shadow/spike_frac"),
    Family("adam/memory_steps", table="Denominator memory, steps (the optimizer's own)"),
    Family("shadow999/memory_steps", table="Denominator memory, steps (shadow, β₂ = 0.999)"),
    Family("shadow95/memory_steps", table="Denominator memory, steps (shadow, β₂ = 0.95)"),
    Family("shadow/memory_steps"),
    Family("adam/memory_events"),
    Family("shadow999/memory_events"),
    Family("adam/memory_event_r"),
    Family("shadow999/memory_event_r"),
    Family("adam/memory_event_r_max"),
    Family("shadow999/memory_event_r_max"),
    Family("adam/event_update_ratio"),
    Family("shadow999/event_update_ratio"),
    Family("adam/memory_damping"),
    Family("shadow999/memory_damping"),
    # The optimizers without a denominator: the update itself, Lion's signs, Muon's singular values.
    Family("update/rms_ratio"),
    Family("lion/sign_flip_frac"),
    Family("muon/sv_cond"),
    Family("muon/sv_max_median"),
)

KNOWN_FAMILIES: tuple[str, ...] = tuple(f.key for f in FAMILIES)
"""The keys of :data:`FAMILIES`. A key ``<family>/<param name>`` is split on these when the run's meta.json does
not list its parameters (with the list, any family splits unambiguously)."""

_registered: list[Family] = list(FAMILIES)
# Longest first, so that "grad/hill_alpha_se/x" is never read as family "grad/hill_alpha", layer "_se/x".
_longest_first: tuple[str, ...] = tuple(sorted(KNOWN_FAMILIES, key=len, reverse=True))


def register_family(family: Family) -> None:
    """Make a family known to :func:`split_key` and the report's tables (a section's new family registers its
    keys through :func:`heavytail.report.sections.register_section`); a known key is left as it is."""
    global _longest_first
    if "/" not in family.key:
        raise ValueError(f"register_family: {family.key!r} is not a per-layer family (it needs a '/')")
    if any(f.key == family.key for f in _registered):
        return
    _registered.append(family)
    _longest_first = tuple(sorted((f.key for f in _registered), key=len, reverse=True))


def families() -> tuple[Family, ...]:
    """Every known family, the built-in ones (:data:`FAMILIES`) first, then those registered since."""
    return tuple(_registered)


def family(key: str) -> Family:
    """The known family ``key`` (a plain :class:`Family` with no table or column if it is not known)."""
    return next((f for f in _registered if f.key == key), Family(key))


def split_key(key: str, param_names: frozenset[str] | set[str] = frozenset()) -> tuple[str, str | None]:
    """Split a metric key into ``(family, layer)``; global keys (``loss``, ``grad/norm``) give ``(key, None)``.

    A family has at least two slash-separated parts (``grad/hill_alpha``), so a two-part key is always global.
    Parameter names come first when known (they may contain slashes), then the known families, then the
    convention that the first two parts are the family.
    """
    parts = key.split("/")
    if len(parts) < 3:
        return key, None
    if param_names:
        for i in range(2, len(parts)):
            layer = "/".join(parts[i:])
            if layer in param_names:
                return "/".join(parts[:i]), layer
    for name in _longest_first:
        if key.startswith(name + "/"):
            return name, key[len(name) + 1 :]
    return "/".join(parts[:2]), "/".join(parts[2:])
