"""Power-law fits (worldpm/report/scaling.py), eval-curve records (worldpm/modeling/eval_curve.py), gradient-norm spikes
(trainlog.py) and the figures drawn from them."""
from __future__ import annotations

import json

import numpy as np
import pytest

from worldpm.errors import StageError
from worldpm.modeling.eval_curve import (
    EvalPoint,
    append_points,
    category_curves,
    points_from_scores,
    read_eval_curve,
    set_curves,
    truncate_after,
)
from worldpm.report.scaling import FitError, fit_power_law
from worldpm.report.trainlog import grad_norm_spikes, pairs_seen

D = np.logspace(3, 6, 12)  # pairs seen at 12 log-spaced evaluation points


@pytest.mark.parametrize("alpha", [0.03, 0.08, 0.2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_power_law_recovers_a_known_exponent_from_a_noisy_curve(alpha, seed):
    rng = np.random.default_rng(seed)
    loss = (150.0 / D) ** alpha * np.exp(rng.normal(0, 0.01, D.size))  # 1% multiplicative noise
    fit = fit_power_law(D, loss)
    assert fit.model == "power"  # no constant in the data: AICc keeps the simpler curve
    assert abs(fit.alpha - alpha) < 0.02
    assert fit.alpha_ci[0] < alpha < fit.alpha_ci[1]
    assert fit.trend == "falls" and not fit.flat
    assert fit.d_c == pytest.approx(150.0, rel=0.5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_power_law_plus_constant_is_chosen_when_the_loss_saturates(seed):
    rng = np.random.default_rng(seed)
    d = np.logspace(3, 7, 20)
    loss = ((3e3 / d) ** 0.3 + 0.5) * np.exp(rng.normal(0, 0.005, d.size))
    fit = fit_power_law(d, loss)
    assert fit.model == "power+const"
    assert fit.aicc["power+const"] < fit.aicc["power"] - 2
    assert abs(fit.alpha - 0.3) < 0.02 and fit.e == pytest.approx(0.5, abs=0.02)
    assert np.allclose(fit.predict(d), (3e3 / d) ** 0.3 + 0.5, rtol=0.02)


@pytest.mark.parametrize("seed", [0, 3])
def test_a_flat_curve_is_called_flat(seed):
    rng = np.random.default_rng(seed)
    loss = 0.69 * np.exp(rng.normal(0, 0.02, D.size))  # a subjective set: no trend, only noise
    fit = fit_power_law(D, loss, name="subjective")
    assert fit.trend == "flat" and fit.flat
    assert fit.alpha_ci[0] <= 0 <= fit.alpha_ci[1]
    assert fit.model == "power" and "flat" in fit.note and "flat" in fit.label()


def test_a_rising_curve_is_not_called_flat():
    loss = (D / 10.0) ** 0.05  # loss that grows with data
    assert fit_power_law(D, loss).trend == "rises"


def test_too_few_points_is_a_one_line_error():
    with pytest.raises(FitError, match=r"rb: a power-law fit needs at least 3 points .* got 2 \(1 left out"):
        fit_power_law([0, 1000, 2000], [0.69, 0.6, 0.55], name="rb")
    fit = fit_power_law([1000, 2000, 4000, 8000], [0.7, 0.62, 0.56, 0.5])  # enough for the power law alone
    assert fit.model == "power" and "power+const not tried: AICc needs 6 points, got 4" in fit.note
    with pytest.raises(FitError, match="3 pairs-seen values but 2 losses"):
        fit_power_law([1, 2, 3], [0.5, 0.4])


# ---- eval-curve records ---------------------------------------------------------------------------------------------
def _points(alpha_by_set: dict[str, tuple[float, str | None]], steps=(10, 20, 40, 80, 160, 320)) -> list[EvalPoint]:
    out = []
    for s in steps:
        for name, (alpha, cat) in alpha_by_set.items():
            out.append(EvalPoint(step=s, pairs_seen=16 * s, tokens_seen=4000 * s, set=name, subset=None,
                                 category=cat, n=100, bt_loss=(20.0 / (16 * s)) ** alpha * 0.9 + 0.0,
                                 accuracy=0.6, lc_accuracy=0.55))
    return out


def test_eval_curve_file_round_trip_truncate_and_one_line_errors(tmp_path):
    path = tmp_path / "eval_curve.jsonl"
    rng = np.random.default_rng(0)
    c, r = rng.normal(1, 1, 40), rng.normal(0, 1, 40)
    pts = points_from_scores(step=5, pairs_seen=80, tokens_seen=9000, set_name="rb", category="adversarial",
                             chosen=c, rejected=r, chosen_len=rng.integers(10, 100, 40),
                             rejected_len=rng.integers(10, 100, 40), subset=["chat"] * 25 + ["safety"] * 15)
    assert [(p.subset, p.n) for p in pts] == [(None, 40), ("chat", 25), ("safety", 15)]
    from worldpm.modeling import metrics as M

    assert pts[0].bt_loss == pytest.approx(M.bt_loss(c, r)) and pts[1].accuracy == pytest.approx(M.accuracy(c[:25],
                                                                                                               r[:25]))
    assert pts[0].lc_accuracy is not None
    later = points_from_scores(step=9, pairs_seen=144, tokens_seen=16000, set_name="rb", category="adversarial",
                               chosen=c, rejected=r)
    append_points(path, pts)
    append_points(path, later)
    assert read_eval_curve(path) == pts + later
    assert truncate_after(path, 5) == 1 and read_eval_curve(path) == pts
    assert read_eval_curve(tmp_path / "none.jsonl") == []
    bad = pts[0].to_json() | {"n": -1}
    path.write_text(json.dumps(pts[0].to_json()) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(StageError, match=r"eval_curve.jsonl:2: n must be a whole number >= 0, got -1"):
        read_eval_curve(path)
    path.write_text(json.dumps({k: v for k, v in pts[0].to_json().items() if k != "pairs_seen"}) + "\n")
    with pytest.raises(StageError, match=r":1: eval-curve record without pairs_seen"):
        read_eval_curve(path)


def test_set_and_category_curves():
    pts = _points({"rb": (0.1, "adversarial"), "hh": (0.05, "adversarial"), "mt": (0.0, "subjective"),
                   "eval": (0.08, None)})
    sets = set_curves(pts)
    assert list(sets) == ["rb", "hh", "mt", "eval"]
    assert sets["rb"].pairs_seen.tolist() == [160, 320, 640, 1280, 2560, 5120]
    cats = category_curves(pts)
    assert set(cats) == {"adversarial", "subjective"}  # the split of the training data has no category
    assert cats["adversarial"].sets == ("rb", "hh")
    assert np.allclose(cats["adversarial"].values, (sets["rb"].values + sets["hh"].values) / 2)
    fit = fit_power_law(sets["rb"].pairs_seen, sets["rb"].values)
    assert fit.alpha == pytest.approx(0.1, abs=1e-6)


# ---- gradient-norm spikes -------------------------------------------------------------------------------------------
def test_grad_norm_spikes_are_found_against_the_trailing_window():
    rng = np.random.default_rng(0)
    g = 1.0 + rng.normal(0, 0.05, 200)
    g[150] = 3.0  # the paper's late spike
    g[3] = 5.0  # before 5 points of history: never judged
    steps = np.arange(1, 201) * 10
    spikes = grad_norm_spikes(steps, g)
    assert [s.step for s in spikes] == [1510]
    assert spikes[0].ratio == pytest.approx(3.0, rel=0.1)
    assert grad_norm_spikes(steps, np.ones(200)) == []  # steady norms (MAD 0): the floor keeps noise out
    flat = np.ones(50)
    flat[40] = 1.7
    assert [s.step for s in grad_norm_spikes(np.arange(50), flat)] == [40]  # > 1.6 x median with MAD 0


def test_pairs_seen_from_the_training_log():
    assert pairs_seen([{"pairs": 16}, {"pairs": 16}, {"pairs": 8}]).tolist() == [16, 32, 40]
    assert pairs_seen([{"pairs_seen": 100, "pairs": 16}, {"pairs_seen": 200, "pairs": 16}]).tolist() == [100, 200]
