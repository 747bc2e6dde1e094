"""Noise tails: tail index and kurtosis of the gradient noise on the sampled coordinates (``noise/``)."""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from heavytail.estimators import noise
from heavytail.families.base import BackwardView, Family, HostViews, Record, Slot, StepView, unscaled

SOURCES = ("temporal", "microbatch", "rank")
RECORDED = {
    "alpha": "hill_alpha",
    "se": "hill_alpha_se",
    "kurtosis": "kurtosis",
    "tail_class": "tail_class",
    "active_frac": "active_frac",
}
"""Record key (after ``noise/`` or ``noise/<source>_``) of each :class:`heavytail.estimators.noise.NoiseTail` field."""


class Noise(Family):
    """Per tensor and noise source, the calibrated reading of ``estimators.noise.noise_tail``:
    ``noise/hill_alpha``, ``noise/hill_alpha_se``, ``noise/tail_class`` (the verdict: light, power, sparse),
    ``noise/active_frac`` and ``noise/kurtosis`` of the temporal source (each coordinate's last W gradients, every
    run), and the same figures as ``noise/microbatch_*`` (micro-batch gradients around their step's median, under
    gradient accumulation) and ``noise/rank_*`` (each rank's gradient around the ranks' median, under DDP).

    A checkpoint's reading pools every full window (``noise_window`` pushes) of its source since the previous
    checkpoint: each time a ring fills, its window is standardised and folded into a tally
    (:class:`heavytail.estimators.noise.NoiseTally`: the largest standardised values and the counts), and the
    checkpoint reads the tally, so that with the defaults (checkpoints every 100 steps, windows of 16) the
    temporal reading rests on six windows, not the last one. A checkpoint with no full window since the previous
    one reads the ring as it stands (its last W pushes). The rank source with more than two ranks, which gathers
    every rank's draws, always reads the ring: a fold would need a collective between checkpoints.

    State (a dict: the micro-batch ring exists once accumulation is seen): ``mean``/``seen``, the temporal
    source's per-coordinate EMA and its count, one ring of deviations per source (the temporal one: g_t -
    EMA_{t-1}, from which the gradients are recovered at checkpoints), for the micro-batch and rank sources a
    ring of the gradients themselves (``<source>_draws``), which shows the atom at zero, and per source the tally
    of the windows folded since the last checkpoint (``<source>_tally_top``, ``<source>_tally_counts``).
    """

    name = "noise"
    version = 3  # the tallies of the windows since the last checkpoint
    report_sections = ("sec-noise-tail-index", "sec-noise-microbatch", "sec-noise-rank", "sec-noise-sources")

    def __init__(self, layout) -> None:
        super().__init__(layout)
        self.slots = dict.fromkeys(SOURCES, 0)
        self.folded = dict.fromkeys(SOURCES, 0)  # windows in each source's tally
        self._micro: list[torch.Tensor] = []
        self._micro_prev: torch.Tensor | None = None
        # DDP: each rank's gradient before the all-reduce, sampled as it is accumulated by LocalSampleTap.
        self.rank_local: torch.Tensor | None = None
        if layout.dist.active and not layout.dist.sharded:
            self.rank_local = torch.zeros(
                layout.num_layers, layout.sample_size, device=layout.device, dtype=layout.dtype
            )

    def init(self) -> dict[str, torch.Tensor]:
        L, S, dev = self.layout.num_layers, self.layout.sample_size, self.layout.device
        window = self.config.noise_window
        temporal = noise.init(L, S, window, dev)
        state = {
            "mean": torch.zeros(L, S, device=dev, dtype=torch.float32),
            "seen": torch.zeros(L, device=dev, dtype=self.layout.dtype),
            "temporal": temporal.values,
            "temporal_valid": temporal.valid,
        }
        state.update(self._tally_state("temporal"))
        if self.layout.dist.active and not self.layout.dist.sharded:
            rank = noise.init(L, S, window, dev)
            state["rank"], state["rank_valid"] = rank.values, rank.valid
            state["rank_draws"] = torch.zeros_like(rank.values)
            state.update(self._tally_state("rank"))
        return state

    def _tally_state(self, source: str) -> dict[str, torch.Tensor]:
        layout = self.layout
        width = layout.sample_size * self.config.noise_window
        if layout.grouped:
            width *= max(len(members) for members in layout.unit_members)
        tally = noise.tally_init(len(layout.units), noise.tally_size(width), layout.device)
        return {f"{source}_tally_top": tally.top, f"{source}_tally_counts": tally.counts}

    def _ensure_ring(self, source: str) -> None:
        if source not in self.state:
            ring = noise.init(
                self.layout.num_layers, self.layout.sample_size, self.config.noise_window, self.layout.device
            )
            self.state[source], self.state[f"{source}_valid"] = ring.values, ring.valid
            self.state[f"{source}_draws"] = torch.zeros_like(ring.values)
            self.state.update(self._tally_state(source))

    def push(self, source: str, deviation: torch.Tensor, valid: torch.Tensor, draw: torch.Tensor | None = None) -> None:
        """One push of ``(L, S)`` deviations into ``source``'s ring, and of the gradients they come from (``draw``)
        into its ring of draws, which shows the atom at zero (the temporal source reconstructs them instead); a
        ring that fills is folded into its tally (the temporal one by ``advance_temporal``, once its EMA moved)."""
        if draw is not None:
            slot = self.slots[source] % self.config.noise_window
            self.state[f"{source}_draws"][:, :, slot] = torch.nan_to_num(draw.to(torch.float32)) * valid[:, None]
        noise.push(
            noise.NoiseRing(self.state[source], self.state[f"{source}_valid"]), self.slots[source], deviation, valid
        )
        self.slots[source] += 1
        if source != "temporal":
            self.pushed(source)

    def pushed(self, source: str) -> None:
        """After a push into ``source``'s ring (and, for the temporal source, its EMA's update): fold the window
        into the tally when the ring has just filled."""
        if self.slots[source] % self.config.noise_window == 0 and self._foldable(source):
            window = self._window(source)
            if window is not None:
                current = noise.NoiseTally(self.state[f"{source}_tally_top"], self.state[f"{source}_tally_counts"])
                merged = self._tally(*window, into=current)
                self.state[f"{source}_tally_top"], self.state[f"{source}_tally_counts"] = merged
                self.folded[source] += 1

    def _foldable(self, source: str) -> bool:
        return not (source == "rank" and self.layout.dist.world > 2)

    def on_backward(self, view: BackwardView) -> None:
        """Under gradient accumulation, the accumulated gradient's samples after each micro-batch: successive
        differences are the micro-batch gradients (this rank's own under DDP: this runs before the all-reduce)."""
        if not view.accumulating:
            return
        samples = view.samples(self.layout)  # shared with the gns family's read of the first pass
        samples = unscaled(self.layout, samples)  # the loss scale may change between steps
        self._micro.append(samples if self._micro_prev is None else samples - self._micro_prev)
        self._micro_prev = samples

    def drop_step(self) -> None:
        self._micro, self._micro_prev = [], None

    def advance_temporal(self, g: torch.Tensor, valid: torch.Tensor) -> None:
        """The torch reference of the temporal source (the sample kernels run it with the other sample families)."""
        mean, seen = self.state["mean"], self.state["seen"]
        self.push("temporal", g - mean, valid & (seen > 0))
        beta = torch.where(seen > 0, self.config.noise_beta, 0.0)[:, None]  # the first value initialises the EMA
        self.state["mean"] = torch.lerp(
            mean, (beta * mean + (1 - beta) * torch.nan_to_num(g)).to(mean.dtype), valid.to(mean.dtype)[:, None]
        )
        self.state["seen"] = seen + valid.to(seen.dtype)
        self.pushed("temporal")

    def update(self, view: StepView) -> None:
        g, valid = view.grad_samples, view.valid
        if len(self._micro) >= 2:
            self._ensure_ring("microbatch")
            micro = torch.stack(self._micro).to(torch.float32)  # (M, L, S)
            # The median, not the mean: one large micro-batch gradient then moves no other one's deviation
            # (noise.centred). Two micro-batches deviate by exact mirror images: the second would only duplicate
            # every magnitude.
            if len(micro) == 2:
                self.push("microbatch", 0.5 * (micro[0] - micro[1]), valid, micro[0])
            else:
                centre = median(micro)
                for sample in micro:
                    self.push("microbatch", sample - centre, valid, sample)
        if self.rank_local is not None:  # sampled before the all-reduce: still scaled, unlike g
            local = unscaled(self.layout, self.rank_local)
            self.push("rank", local - g, valid, local)
        self._micro, self._micro_prev = [], None

    def _window(self, source: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``(values, mask, draws)`` ``(L, S, W')`` of ``source``'s ring as its reading takes them (the rank
        source with more than two ranks gathers every rank's draws, W' = ranks x W), or None without a ring."""
        if source not in self.state:
            return None
        dist = self.layout.dist
        ring = noise.NoiseRing(self.state[source], self.state[f"{source}_valid"])
        values, mask = ring.values, noise.draw_mask(ring).contiguous()  # an expanded view makes every op slow
        if source == "temporal":
            values, draws = noise.temporal_window(ring, self.state["mean"], self.slots[source], self.config.noise_beta)
        else:
            draws = self.state[f"{source}_draws"]
        # With two ranks each rank's deviation is exactly minus the other's (they sum to zero): gathering
        # would only duplicate every magnitude, which ties the order statistics, so rank 0's alone are used.
        # With more, each step's rank gradients are centred on their median (see noise.centred).
        if source == "rank" and dist.world > 2:
            valid_slots = dist.gather_cat(ring.valid.to(draws.dtype), dim=1) > 0  # (L, ranks * W)
            draws = dist.gather_cat(draws, dim=2)
            mask = valid_slots[:, None, :].expand_as(draws)
            per_step = draws.to(torch.float64).unflatten(2, (dist.world, -1))
            values = (per_step - per_step.quantile(0.5, dim=2, keepdim=True)).flatten(2)
            values = torch.where(mask, values, 0.0)
        if self._per_rank(source):
            mask = mask & (self.layout.owner > 0)[:, None, None]  # one copy of each piece (DistContext.owners)
        return values, mask, draws

    def _per_rank(self, source: str) -> bool:
        dist = self.layout.dist
        return source != "rank" and dist.sharded or (source == "microbatch" and dist.active)

    def _tally(
        self, values: torch.Tensor, mask: torch.Tensor, draws: torch.Tensor, into: noise.NoiseTally | None = None
    ) -> noise.NoiseTally:
        """One window's tally per unit (merged ``into`` a tally), a group pooling its members' coordinates."""
        size = self.state["temporal_tally_top"].shape[1]
        if not self.layout.grouped:
            return noise.tally(values, mask, draws, size, into)
        parts = [
            noise.tally(
                *(t[members].reshape(1, -1, t.shape[2]) for t in (values, mask, draws)),
                size,
                None if into is None else noise.NoiseTally(into.top[u : u + 1], into.counts[u : u + 1]),
            )
            for u, members in enumerate(self.layout.unit_members)
        ]
        return noise.NoiseTally(torch.cat([p.top for p in parts]), torch.cat([p.counts for p in parts]))

    def readout(self, step: int) -> dict[str, Slot]:
        """Each source's tail reading (:func:`heavytail.estimators.noise.read`) of the windows folded since the
        last checkpoint, or of its ring as it stands when none was, ``(U, 6)`` per source in
        :data:`heavytail.estimators.noise.FIELDS` order.

        Rank noise (DDP) pools every rank's deviations (gathered here: a coordinate's draws are its deviations on
        every rank and step). Sources that differ between ranks are estimated on each rank from its own
        deviations, exactly as one process estimates them, and the record reads the mean over ranks: under
        sharding the temporal and micro-batch sources (each rank samples its own piece), under DDP the
        micro-batch source (each rank's micro-batches are its own). Those are summable ``(U, 10)`` rows
        (:func:`rank_tail_sums`), merged by the checkpoint's sum all-reduce.
        """
        slots = {}
        min_count = self.config.min_tail_samples
        for source in SOURCES:
            if source not in self.state:
                continue
            if self.folded[source] > 0:
                tally = noise.NoiseTally(self.state[f"{source}_tally_top"], self.state[f"{source}_tally_counts"])
            else:
                window = self._window(source)
                tally = self._tally(*window)
            out = noise.read(tally, min_count).packed()
            if self._per_rank(source):
                slots[f"{source}_rank_sums"] = Slot(
                    rank_tail_sums(out).to(self.layout.dtype), "sum", varies_by_rank=True
                )
            else:
                slots[source] = Slot(out, "none")
        return slots

    def reset(self) -> None:
        """A checkpoint has read the tallies: start the next interval's."""
        for source in SOURCES:
            if f"{source}_tally_top" in self.state and self.folded[source]:
                self.state[f"{source}_tally_top"].zero_()
                self.state[f"{source}_tally_counts"].zero_()
                self.folded[source] = 0

    def metrics(self, views: HostViews, record: Record) -> dict[str, float]:
        out: dict[str, float] = {}
        for source in SOURCES:
            if views.has(self.name, f"{source}_rank_sums"):
                values = rank_mean_tails(torch.from_numpy(views.get(self.name, f"{source}_rank_sums"))).double().numpy()
            elif views.has(self.name, source):
                values = views.get(self.name, source)
            else:
                continue
            prefix = "noise/" if source == "temporal" else f"noise/{source}_"
            for i, name in enumerate(self.layout.units):
                for field, value in zip(noise.FIELDS, values[i]):
                    if field in RECORDED:
                        out[f"{prefix}{RECORDED[field]}/{name}"] = float(value)
        return out

    def host_state(self) -> dict[str, Any]:
        return {"slots": dict(self.slots), "folded": dict(self.folded)}

    def load_host_state(self, state: Mapping[str, Any]) -> None:
        self.slots.update({k: int(v) for k, v in state.get("slots", {}).items()})
        self.folded.update({k: int(v) for k, v in state.get("folded", {}).items()})

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if "microbatch" in tensors:
            self._ensure_ring("microbatch")
        super().load_state_tensors(tensors)


def median(x: torch.Tensor) -> torch.Tensor:
    """The median over dim 0 (the mean of the two middle values of an even count, as ``quantile(0.5)``), from
    one sort: about half of ``quantile``'s CPU time on the monitor's ``(M, L, S)`` micro-batch samples (M = 3-4)."""
    ordered = x.sort(dim=0).values
    m = len(x)
    return ordered[m // 2] if m % 2 else 0.5 * (ordered[m // 2 - 1] + ordered[m // 2])


def rank_tail_sums(tails: torch.Tensor) -> torch.Tensor:
    """One rank's noise-tail readings ``(U, 6)`` (:data:`heavytail.estimators.noise.FIELDS`) as summable rows
    ``(U, 10)``: Hill's gamma = 1/alpha and its squared standard error (delta method: se / alpha^2) where the rank
    has an estimate, that count, the kurtosis where it has one, that count, one vote per verdict (light, power,
    sparse), and the active fraction with its count. A light tail (alpha = inf) is gamma = 0."""
    t = tails.to(torch.float64)
    alpha, se, kurt, code, active = t[:, 0], t[:, 1], t[:, 2], t[:, 3], t[:, 4]
    has_alpha = ~torch.isnan(alpha)
    light = torch.isinf(alpha)
    gamma = torch.where(has_alpha & ~light, 1.0 / alpha, 0.0)
    se_gamma = torch.where(has_alpha & ~light, se / (alpha * alpha), 0.0)
    has_kurt = torch.isfinite(kurt)
    votes = [(code == c).to(t.dtype) for c in (noise.LIGHT, noise.POWER, noise.SPARSE)]
    has_active = ~torch.isnan(active)
    return torch.stack(
        [
            gamma,
            se_gamma * se_gamma,
            has_alpha.to(t.dtype),
            torch.where(has_kurt, kurt, 0.0),
            has_kurt.to(t.dtype),
            *votes,
            torch.where(has_active, active, 0.0),
            has_active.to(t.dtype),
        ],
        dim=1,
    )


def rank_mean_tails(sums: torch.Tensor) -> torch.Tensor:
    """The ranks' readings merged from :func:`rank_tail_sums` rows summed over ranks, ``(U, 6)``: alpha = 1 /
    (mean gamma), the harmonic mean of the ranks' alphas (Hill's estimator is a mean of log-spacings, an estimate
    of gamma, so the mean of independent estimates is one of the same gamma), its standard error
    sqrt(sum se_gamma^2) / n / gamma^2, the mean kurtosis, the verdict most ranks gave (a tie goes to ``power``,
    then ``sparse``: the heavier reading is the one to act on), the mean active fraction, and NaN for the moment
    estimator (not merged); NaN where no rank has a figure."""
    gamma_sum, se_sq, n_alpha, kurt_sum, n_kurt, n_light, n_power, n_sparse, active_sum, n_active = sums.unbind(dim=1)
    gamma = gamma_sum / n_alpha
    alpha = torch.where(n_alpha > 0, 1.0 / gamma, math.nan)  # gamma = 0 (every rank light): inf, as one process
    se = torch.where(gamma > 0, se_sq.sqrt() / n_alpha / (gamma * gamma), math.inf)  # inf with alpha, as Hill's
    se = torch.where(n_alpha > 0, se, math.nan)
    kurt = torch.where(n_kurt > 0, kurt_sum / n_kurt, math.nan)
    code = torch.where(
        (n_power >= n_sparse) & (n_power >= n_light),
        float(noise.POWER),
        torch.where(n_sparse >= n_light, float(noise.SPARSE), float(noise.LIGHT)),
    )
    code = torch.where(n_light + n_power + n_sparse > 0, code, math.nan)
    active = torch.where(n_active > 0, active_sum / n_active, math.nan)
    return torch.stack([alpha, se, kurt, code, active, torch.full_like(alpha, math.nan)], dim=1).to(torch.float32)
