"""DDP, FSDP2 and FSDP2 + TP for real (gloo, CPU processes): every key equals one process or is as documented."""

from __future__ import annotations

import json
import math
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import heavytail as ht
from heavytail.estimators import noise
from heavytail.families.noise import rank_mean_tails as _rank_mean_tails
from heavytail.families.noise import rank_tail_sums as _rank_tail_sums
from heavytail.families.updates import COLUMN as _U
from tests import _distributed_worker as worker
from tests import noise_reference
from tests.conftest import read_records

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")

DOC = Path(__file__).resolve().parents[1] / "docs" / "distributed.md"
COLUMNS = {"ddp": 1, "fsdp": 2, "fsdp_tp": 3}
VARIANTS = {
    "plain": {},
    "accumulate_clip": {"accumulate": 2, "clip": 0.3},
    "lion_accumulate_clip": {"optimizer": "lion", "accumulate": 2, "clip": 0.3},
    "muon": {"optimizer": "muon"},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``runs(mode, world, variant)``: (records, every rank's dump), each run made once per module."""
    cache: dict = {}

    def get(mode: str, world: int, variant: str):
        if (mode, world, variant) not in cache:
            path = tmp_path_factory.mktemp(f"{mode}{world}-{variant}") / "run"
            options = dict(VARIANTS[variant], rank_noise=mode == "ddp" and world > 2)
            if mode == "single":
                worker.run(0, 1, "single", 0, str(path), options)
            else:
                mp.spawn(worker.run, args=(world, mode, _free_port(), str(path), options), nprocs=world, join=True)
            dumps = [json.loads(Path(f"{path}.rank{r}.json").read_text()) for r in range(world)]
            cache[(mode, world, variant)] = (read_records(path), dumps)
        return cache[(mode, world, variant)]

    return get


# ------------------------------------------------------------------ the documented verdicts


def _documented() -> list[tuple[re.Pattern, list[set[str]]]]:
    """The rows of docs/distributed.md's key table: (key pattern, verdicts per column DDP, FSDP2, FSDP2 + TP)."""
    rows = []
    for line in DOC.read_text().splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        verdicts = [set(re.findall(r"\*\*(equal|rank-dependent|absent|added)\*\*", c)) for c in cells[1:4]]
        for key in re.findall(r"`([^`]+)`", cells[0]):
            pattern = re.escape(key).replace("<p>", "[^/]+").replace(r"shadow\*", r"shadow\d+")
            rows.append((re.compile(pattern.replace(r"\.\.\.", ".+")), verdicts))
    return rows


def _close(key: str, got, want, muon: set[str]) -> bool:
    """Equal as the table's float32 (and Muon's bfloat16) exceptions allow."""
    if want is None or got is None:
        return want is None and got is None
    if re.match(r"(update/rms_ratio|[^/]+/event_update_ratio|[^/]+/memory_damping)/", key):
        return got == pytest.approx(want, rel=5e-3 if key.split("/", 2)[2] in muon else 1e-5)
    if "hill_alpha" in key:  # logs of order statistics: ulp-level gradient differences move alpha by up to 5e-5
        return got == pytest.approx(want, rel=1e-4 * max(1.0, abs(want) / 4))
    if key.startswith("grad/kurtosis/"):
        return got + 3 == pytest.approx(want + 3, rel=1e-5)
    # g / sqrt(v) with tiny v: float32 sums, amplified
    if re.match(r"(adam|shadow\d+)/(ratio_max|ratio_p99|memory_event_r|memory_event_r_max)/", key):
        return got == pytest.approx(want, rel=1e-3)
    if key.startswith("muon/") and want > 1e6:
        return got > 1e6
    return got == pytest.approx(want, rel=1e-5, abs=1e-12)


def _check_every_key(records, reference, mode: str) -> dict[str, int]:
    rows, column = _documented(), COLUMNS[mode]
    assert len(rows) > 40, "docs/distributed.md lost its key table"
    assert [r["step"] for r in records] == [r["step"] for r in reference]
    muon = {k.split("/", 2)[2] for r in reference for k in r["metrics"] if k.startswith("muon/")}
    seen = {"equal": 0, "rank-dependent": 0, "absent": 0, "added": 0}
    for got_record, want_record in zip(records, reference):
        got, want = got_record["metrics"], want_record["metrics"]
        for key in sorted(set(got) | set(want)):
            matches = [verdicts for pattern, verdicts in rows if pattern.fullmatch(key)]
            assert matches, f"{key}: no row of docs/distributed.md names it"
            allowed = matches[0][column - 1]
            if key not in got:
                verdict = "absent"
            elif key not in want:
                verdict = "added"
            elif _close(key, got[key], want[key], muon):
                verdict = "equal" if "equal" in allowed else "rank-dependent"
            else:
                verdict = "rank-dependent"
            assert verdict in allowed, (
                f"step {got_record['step']} {key}: {verdict} (got {got.get(key)!r}, one process {want.get(key)!r}), "
                f"docs/distributed.md says {sorted(allowed)} under {mode}"
            )
            seen[verdict] += 1
    return seen


@pytest.mark.parametrize(
    "mode, world, variant",
    [
        ("ddp", 2, "muon"),
        ("ddp", 4, "plain"),
        ("ddp", 2, "accumulate_clip"),
        ("fsdp", 2, "plain"),
        ("fsdp", 2, "lion_accumulate_clip"),
        ("fsdp_tp", 4, "accumulate_clip"),
    ],
)
def test_every_key_equals_one_process_or_is_documented(runs, mode, world, variant):
    records, _ = runs(mode, world, variant)  # every rank was given the directory: only rank 0 writes
    reference, _ = runs("single", 1, variant)
    assert len(records) == len(reference) == 3  # steps 2 and 4, and the partial interval close() writes at 5
    seen = _check_every_key(records, reference, mode)
    assert seen["equal"] > 150, seen
    families = {k.split("/")[0] for r in records for k in r["metrics"]}
    assert {"grad", "noise", "shadow999", "update", "loss"} <= families
    assert ("adam" in families) != variant.startswith("lion")
    assert ("lion" in families) == variant.startswith("lion")
    assert ("muon" in families) == (variant == "muon")


# ------------------------------------------------------------------ pre-clip norms


@pytest.mark.parametrize(
    "mode, world, variant",
    [
        ("ddp", 2, "muon"),  # nothing changes the gradients: the pre-clip norm is taken from the step's own sums
        ("ddp", 2, "accumulate_clip"),
        ("fsdp", 2, "lion_accumulate_clip"),
        ("fsdp_tp", 4, "accumulate_clip"),
    ],
)
def test_preclip_norm_is_the_reduced_gradient_before_clipping_on_every_rank(runs, mode, world, variant):
    records, dumps = runs(mode, world, variant)
    names = dumps[0]["names"]
    # The squares of the whole gradient before clipping, computed by the worker with plain torch (full_tensor()).
    full = np.array(dumps[0]["full_sq"])
    start = 0
    for record in records:
        end = record["step"]
        interval = full[start:end]
        metrics = record["metrics"]
        for i, name in enumerate(names):
            want = math.sqrt(interval[:, i].mean())
            assert metrics[f"grad/norm_preclip/{name}"] == pytest.approx(want, rel=1e-6), (end, name)
        assert metrics["grad/norm_preclip"] == pytest.approx(math.sqrt(interval.sum(axis=1).mean()), rel=1e-6)
        if "clip" in variant:  # clipping did act: the step saw smaller gradients than the pre-clip ones
            assert metrics["grad/norm"] < 0.9 * metrics["grad/norm_preclip"]
        start = end
    # Every rank's own reading of the last step (the interval close() writes): its piece of the reduced gradient,
    # which is the whole gradient under DDP.
    for rank, dump in enumerate(dumps):
        local = np.array(dump["local_sq"][-1])
        assert dump["preclip_s2"] == pytest.approx(local, rel=1e-9, abs=1e-300), rank
        if mode == "ddp":
            assert local == pytest.approx(full[-1], rel=1e-6), rank


# ------------------------------------------------------------------ gradient noise scale


@pytest.mark.parametrize("world, variant", [(4, "plain"), (2, "accumulate_clip")])
def test_gns_small_batch_is_each_rank_s_first_pass_before_the_all_reduce(runs, world, variant):
    """The rank source (no accumulation: b = one rank's share, B = world) and the micro-batch source under DDP
    (b = one rank's first micro-batch, B = micro-batches x world): each rank's running means of the two estimates
    from its own first pass (read before the all-reduce) and the reduced pre-clip gradient, averaged over ranks,
    in micro-batches. Recomputed from the worker's plain-torch gradients; every step counts under DDP."""
    records, dumps = runs("ddp", world, variant)
    names = dumps[0]["names"]
    micro = worker.DEFAULTS["accumulate"] if variant == "plain" else VARIANTS[variant]["accumulate"]
    b, B = 1.0, float(micro * world)
    big = np.array(dumps[0]["full_sq"])  # (steps, L): the reduced gradient before clipping
    for record in records:
        n = record["step"]
        metrics = record["metrics"]
        per_rank = []
        for dump in dumps:
            small = np.array(dump["first_sq"])[:n] * micro**2  # on the step gradient's scale
            rows = [(small[:, i], big[:n, i]) for i in range(len(names))]
            rows.append((small.sum(axis=1), big[:n].sum(axis=1)))  # the whole model
            per_rank.append(
                [((B * S - b * s) / (B - b)).mean() for s, S in rows]
                + [((s - S) / (1 / b - 1 / B)).mean() for s, S in rows]
            )
        want = np.mean(per_rank, axis=0)
        L = len(names) + 1
        grad_sq, trace = want[:L], want[L:]
        for i, name in enumerate([*names, None]):
            suffix = "" if name is None else f"/{name}"
            assert metrics[f"gns/grad_sq{suffix}"] == pytest.approx(grad_sq[i], rel=1e-5), (n, name)
            assert metrics[f"gns/trace_sigma{suffix}"] == pytest.approx(trace[i], rel=1e-5), (n, name)
            if trace[i] > 0 and grad_sq[i] > 0:
                assert metrics[f"gns/b_simple{suffix}"] == pytest.approx(trace[i] / grad_sq[i], rel=1e-5)
        assert (metrics["gns/small_batch"], metrics["gns/big_batch"]) == (b, B)
        assert (metrics["gns/micro_batches"], metrics["gns/ranks"]) == (micro, world)


# ------------------------------------------------------------------ rank noise with four ranks


def test_rank_noise_of_four_ranks_pools_their_own_gradients(runs):
    records, dumps = runs("ddp", 4, "plain")
    names, index = dumps[0]["names"], dumps[0]["sample_index"]
    own = np.array(dumps[0]["rank_samples"], dtype=np.float64)  # (rank, step, tensor, sample), from autograd.grad
    assert own.shape == (4, 5, len(names), len(index[0]))
    last = records[-1]["metrics"]  # written at step 5: the ring holds the 5 steps of all 4 ranks
    for i, name in enumerate(names):
        draws = own[:, :, i, :].transpose(2, 0, 1)  # (sample, rank, step)
        deviations = draws - np.median(draws, axis=1, keepdims=True)  # around the ranks' median at each step
        draws, deviations = draws.reshape(draws.shape[0], -1), deviations.reshape(draws.shape[0], -1)
        expected = noise_reference.tail(draws, np.ones_like(draws, dtype=bool), deviations, min_count=1000)
        for field, value in expected.items():
            got = last[f"noise/rank_{field}/{name}"]
            if not math.isfinite(value):  # NaN: not computed; inf (a tied top): JSON has no Inf, both are null
                assert got is None, (name, field)
            else:
                assert got == pytest.approx(value, rel=1e-3, abs=1e-6), (name, field)


# ------------------------------------------------------------------ the rank-dependent figures' merges


@pytest.mark.parametrize("mode, world, variant", [("fsdp", 2, "plain"), ("fsdp_tp", 4, "accumulate_clip")])
def test_sample_based_figures_are_means_over_the_sampling_ranks(runs, mode, world, variant):
    """The last record (the step-5 interval) from the ranks' own interval state, as the table defines it."""
    records, dumps = runs(mode, world, variant)
    names = dumps[0]["names"]
    last = records[-1]["metrics"]
    st = [{k: np.array(v, dtype=np.float64) for k, v in d["state"].items()} for d in dumps]
    sampling = np.array([d["sampling"] for d in dumps])  # (rank, tensor): 1 where the rank's piece counts
    assert (sampling.sum(axis=0) >= 1).all() and (sampling == 0).any()  # some pieces are empty or copies
    for i, name in enumerate(names):
        ranks = [r for r in range(world) if sampling[r, i]]
        events = sum(st[r]["memory.sums"][0, i, 0] for r in ranks) / len(ranks)
        assert last[f"adam/memory_events/{name}"] == pytest.approx(events, rel=1e-12), name
        p99 = sum(st[r]["ratio.sums"][i, 1] for r in ranks)  # heavytail.families.ratio.SUMS
        steps = sum(st[r]["ratio.maxes"][i, 1] for r in ranks)  # heavytail.families.ratio.MAXES
        assert last[f"adam/ratio_p99/{name}"] == pytest.approx(p99 / steps, rel=1e-12), name
        with_steps = [r for r in ranks if st[r]["shadow.maxes"][0, i, 1] > 0]
        top = np.mean([st[r]["shadow.maxes"][0, i, 0] for r in with_steps])
        assert last[f"shadow999/ratio_max/{name}"] == pytest.approx(top, rel=1e-12), name
        frac = sum(st[r]["shadow.spike_sum"][0, i] for r in ranks) / sum(st[r]["shadow.maxes"][0, i, 1] for r in ranks)
        assert last[f"shadow999/spike_frac/{name}"] == pytest.approx(frac, rel=1e-12), name
        rms = sum(st[r]["updates.sums"][i, _U["rms_ratio"]] for r in ranks)
        assert last[f"update/rms_ratio/{name}"] == pytest.approx(
            rms / sum(st[r]["updates.sums"][i, _U["rms_steps"]] for r in ranks), rel=1e-12
        )
        # Temporal noise: each rank's reading on its own ring, merged as a harmonic mean of alphas.
        estimates = []
        for r in ranks:
            ring = noise.NoiseRing(
                torch.tensor(st[r]["noise.temporal"][i : i + 1], dtype=torch.float32),
                torch.tensor(st[r]["noise.temporal_valid"][i : i + 1] > 0),
            )
            mean = torch.tensor(st[r]["noise.mean"][i : i + 1], dtype=torch.float32)
            values, draws = noise.temporal_window(ring, mean, dumps[r]["noise_pushes"], 0.9)
            mask = noise.draw_mask(ring)
            estimates.append(noise.noise_tail(values, mask, draws, 1000).packed()[0].double())
        kurt = [e[2].item() for e in estimates if math.isfinite(e[2])]
        got = last[f"noise/kurtosis/{name}"]
        assert (got is None) == (not kurt) and (not kurt or got == pytest.approx(np.mean(kurt), rel=1e-5)), name
        gammas = [1 / e[0].item() for e in estimates if not math.isnan(e[0])]  # 1 / inf = 0: a light tail
        want = (1 / np.mean(gammas) if np.mean(gammas) > 0 else math.inf) if gammas else None
        got = last[f"noise/hill_alpha/{name}"]
        assert (got is None) == (want is None or not math.isfinite(want)), name
        if got is not None:
            assert got == pytest.approx(want, rel=1e-5), name


def test_rank_tail_merge_is_the_harmonic_mean_with_its_standard_error():
    nan, inf = math.nan, math.inf
    ranks = torch.tensor(
        [  # alpha, se, kurtosis, verdict, active fraction, DEdH alpha
            [[2.0, 0.4, 5.0, 1, 1.0, 2.5], [inf, inf, 1.0, 0, 0.9, inf], [nan] * 6, [inf, inf, 0.5, 0, 1.0, inf]],
            [[4.0, 1.0, 7.0, 1, 0.8, 3.0], [3.0, 0.6, nan, 1, 0.7, 4.0], [nan] * 6, [inf, inf, 1.5, 2, 0.2, inf]],
        ]
    )
    merged = _rank_mean_tails(sum(_rank_tail_sums(r) for r in ranks)).double()
    gamma = (1 / 2 + 1 / 4) / 2
    se = math.sqrt((0.4 / 4) ** 2 + (1.0 / 16) ** 2) / 2 / gamma**2
    assert merged[0, :5].tolist() == pytest.approx([1 / gamma, se, 6.0, 1, 0.9], rel=1e-6)
    # A light rank (alpha = inf) counts as gamma = 0 with no spread; the kurtosis is the mean of those known;
    # a tie of verdicts goes to the heavier one (power over light, sparse over light).
    assert merged[1, :5].tolist() == pytest.approx([6.0, math.sqrt((0.6 / 9) ** 2) / 2 * 36, 1.0, 1, 0.8], rel=1e-6)
    assert torch.isnan(merged[2]).all()
    assert merged[3, 0] == math.inf and merged[3, 2].item() == pytest.approx(1.0)
    assert merged[3, 3].item() == 2 and merged[3, 4].item() == pytest.approx(0.6)
    assert torch.isnan(merged[:, 5]).all()  # the moment estimator is not merged
    # One rank reads back exactly what it estimated (but the moment estimator).
    one = ranks[0, :2]
    assert torch.equal(_rank_mean_tails(_rank_tail_sums(one))[:, :5], one[:, :5])


# ------------------------------------------------------------------ refused at attach


def test_parameters_on_several_devices_are_refused_at_attach(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4, device="meta"))
    with pytest.raises(ValueError, match=r"several devices: cpu \(first: 0\.weight\), meta \(first: 1\.weight\)"):
        ht.Monitor(model, torch.optim.SGD(model.parameters(), lr=0.1), log_dir=tmp_path)
    assert not (tmp_path / "meta.json").exists()
    # One device's parameters can still be watched.
    ht.Monitor(model, log_dir=tmp_path, include=["0.*"]).close()


def test_a_partial_placement_is_refused_at_attach(runs):
    _, dumps = runs("fsdp_tp", 4, "accumulate_clip")
    for dump in dumps:
        assert dump["refused"] is not None and "'summands'" in dump["refused"] and "Partial(sum)" in dump["refused"]
