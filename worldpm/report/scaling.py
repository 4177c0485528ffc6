"""Power-law fits of a loss curve L(D) over the pairs seen D, as the WorldPM paper reads its test-loss curves.

Two models, both fitted by least squares on log L (the noise of a loss curve is multiplicative: a point at 0.3
is not trusted more than a point at 0.6), with x = log D:

* ``power``        L = (D_c / D)^alpha              log L = a - alpha x            (a = alpha log D_c): ordinary least
                                                                                    squares, closed form
* ``power+const``  L = (D_c / D)^alpha + E          log L = log(exp(a - alpha x) + E), 0 <= E < min L: Gauss-Newton
                                                    with bounds (scipy's trust-region ``least_squares``), several starts

**Which one.** The corrected Akaike criterion, AICc = n log(RSS / n) + 2k + 2k(k + 1) / (n - k - 1), with k the
curve's parameters plus the noise variance (3 and 4), over the same log-space residuals. ``power+const`` is taken
only when its AICc is lower by more than 2 (a difference under 2 is no real support, and the simpler curve stays).
AICc rather than AIC because eval curves have ~10 points, where plain AIC over-fits; AICc needs n >= k + 2, so
``power+const`` is tried from 6 points on.

**alpha's interval.** 95%, from the covariance of the fit: s^2 (J^T J)^-1 at the optimum (J the Jacobian of the
log-space residuals, s^2 = RSS / (n - p)), alpha +- t(0.975, n - p) x its standard error. For ``power`` this is the
exact OLS interval of the slope.

**Flat.** A curve is flat when the 95% interval of the log-log slope (the ``power`` fit's alpha) contains 0: the
t-test of a trend at 5%. That test does not depend on the model chosen; a flat curve is reported with the
``power`` fit and no model choice (there is no exponent to choose a model for). ``rises`` when the interval lies
below 0 (the loss grows with data), ``falls`` when above.

Too few points (fewer than 3 with D > 0 and L > 0) is a ``FitError`` that says how many there were.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

import numpy as np

MIN_POINTS = 3             # two parameters and one degree of freedom for the slope's interval
MIN_POINTS_CONST = 6       # power+const: 3 parameters + the variance, and AICc's n - k - 1 > 0
AICC_MARGIN = 2.0          # power+const must beat power by more than this
LEVEL = 0.95


class FitError(ValueError):
    """A curve that cannot be fitted; the message is one line."""


@dataclass(frozen=True)
class PowerLawFit:
    """One curve's fit. ``log_scale`` is a in log L = a - alpha log D (``power``) or of the power part
    (``power+const``); ``d_c`` = exp(a / alpha) when alpha is not 0."""

    model: str                      # "power" | "power+const"
    alpha: float
    alpha_ci: tuple[float, float]
    log_scale: float
    e: float | None                 # the irreducible loss E of power+const
    n: int                          # points fitted
    trend: str                      # "falls" | "flat" | "rises"
    slope_alpha: float              # the log-log slope's alpha (the power fit) and its interval: the trend test
    slope_ci: tuple[float, float]
    aicc: dict[str, float] = field(default_factory=dict)  # per model tried
    rss: float = 0.0                # of the chosen model, in log space
    note: str = ""

    @property
    def d_c(self) -> float | None:
        if self.alpha == 0:
            return None
        v = self.log_scale / self.alpha
        return math.exp(v) if v < 700 else math.inf

    @property
    def flat(self) -> bool:
        return self.trend == "flat"

    def predict(self, d: Sequence[float] | np.ndarray) -> np.ndarray:
        x = np.log(np.asarray(d, dtype=np.float64))
        power = np.exp(self.log_scale - self.alpha * x)
        return power + (self.e or 0.0)

    def label(self) -> str:
        """alpha with its interval, for a legend or a table cell: '0.081 [0.074, 0.088]' (+ ', E 0.41', ' flat')."""
        lo, hi = self.alpha_ci
        s = f"{f3(self.alpha)} [{f3(lo)}, {f3(hi)}]"
        if self.model == "power+const":
            s += f", E {self.e:.3f}"
        return s + (" flat" if self.flat else "")

    def to_json(self) -> dict:
        d = asdict(self)
        d["alpha_ci"], d["slope_ci"] = list(self.alpha_ci), list(self.slope_ci)
        d["d_c"] = self.d_c
        return d


def f3(x: float) -> str:
    """3 decimals, without the '-0.000' of a tiny negative number."""
    t = f"{x:.3f}"
    return "0.000" if t == "-0.000" else t


# ---- the fits ---------------------------------------------------------------------------------------------------
def _t(df: int) -> float:
    """The t distribution's two-sided LEVEL quantile (scipy.special's: scipy.stats takes a second to import)."""
    from scipy.special import stdtrit

    return float(stdtrit(df, 0.5 + LEVEL / 2))


def _aicc(rss: float, n: int, k: int) -> float:
    rss = max(rss, n * 1e-300)  # a perfect fit (synthetic data) must not give log(0)
    return n * math.log(rss / n) + 2 * k + 2 * k * (k + 1) / (n - k - 1) if n - k - 1 > 0 else math.inf


def _fit_power(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float, tuple[float, float]]:
    """OLS of y = a - alpha x: (a, alpha, rss, alpha's interval)."""
    n = x.size
    xm = x.mean()
    sxx = float(((x - xm) ** 2).sum())
    slope = float(((x - xm) * (y - y.mean())).sum() / sxx)
    a = float(y.mean() - slope * xm)
    rss = float(((y - (a + slope * x)) ** 2).sum())
    se = math.sqrt(rss / (n - 2) / sxx) if n > 2 else math.inf
    h = _t(n - 2) * se
    return a, -slope, rss, (-slope - h, -slope + h)


def _fit_power_const(x: np.ndarray, y: np.ndarray, loss: np.ndarray, start_alpha: float):
    """Bounded least squares of y = log(exp(a - alpha x) + E): (a, alpha, E, rss, alpha's interval) or None."""
    from scipy.optimize import least_squares

    lmin = float(loss.min())
    best = None
    for frac in (0.1, 0.5, 0.8, 0.95):  # starts for E: the fit is not convex in E
        e0 = frac * lmin
        yy = np.log(loss - e0)
        a0, al0, _, _ = _fit_power(x, yy)
        if not math.isfinite(al0) or al0 <= 0:
            al0 = max(start_alpha, 0.05)

        def resid(p):
            return y - np.log(np.exp(p[0] - p[1] * x) + p[2])

        def jac(p):
            pw = np.exp(p[0] - p[1] * x)
            m = pw + p[2]
            return np.stack([-pw / m, x * pw / m, -1.0 / m], axis=1)

        try:
            r = least_squares(resid, [a0, al0, e0], jac=jac, bounds=([-np.inf, -10.0, 0.0], [np.inf, 10.0, lmin]),
                              x_scale="jac", max_nfev=2000)
        except (ValueError, FloatingPointError):
            continue
        if best is None or r.cost < best.cost:
            best = r
    if best is None or not np.all(np.isfinite(best.x)):
        return None
    a, alpha, e = (float(v) for v in best.x)
    n = x.size
    rss = float(2 * best.cost)
    J = best.jac
    try:
        cov = np.linalg.inv(J.T @ J) * rss / (n - 3)
        se = math.sqrt(max(float(cov[1, 1]), 0.0))
    except np.linalg.LinAlgError:
        se = math.inf
    h = _t(n - 3) * se
    return a, alpha, e, rss, (alpha - h, alpha + h)


def fit_power_law(pairs_seen: Iterable[float], loss: Iterable[float], *, name: str = "curve") -> PowerLawFit:
    """Fit L(D) = (D_c / D)^alpha, and (D_c / D)^alpha + E from 6 points on, and choose by AICc (module doc).

    Points with D <= 0 (the untrained model) or a missing / non-positive loss are left out (said in ``note``)."""
    d = np.asarray(list(pairs_seen), dtype=np.float64)
    L = np.asarray([np.nan if v is None else v for v in loss], dtype=np.float64)
    if d.shape != L.shape:
        raise FitError(f"{name}: {d.size} pairs-seen values but {L.size} losses")
    ok = np.isfinite(d) & np.isfinite(L) & (d > 0) & (L > 0)
    dropped = int((~ok).sum())
    d, L = d[ok], L[ok]
    if np.unique(d).size < MIN_POINTS:
        raise FitError(f"{name}: a power-law fit needs at least {MIN_POINTS} points at distinct pairs-seen values "
                       f"> 0 with a positive loss; got {np.unique(d).size}"
                       + (f" ({dropped} left out: pairs seen 0 or no loss)" if dropped else ""))
    order = np.argsort(d)
    d, L = d[order], L[order]
    x, y = np.log(d), np.log(L)
    n = x.size
    notes = [f"{dropped} point(s) left out (pairs seen 0 or no loss)"] if dropped else []

    a, alpha, rss, ci = _fit_power(x, y)
    trend = "flat" if ci[0] <= 0 <= ci[1] else ("falls" if ci[0] > 0 else "rises")
    aicc = {"power": _aicc(rss, n, 3)}
    chosen = PowerLawFit("power", alpha, ci, a, None, n, trend, alpha, ci, aicc, rss)
    if trend == "flat":
        notes.append("flat: the log-log slope's 95% interval contains 0, no model choice")
    elif n < MIN_POINTS_CONST:
        notes.append(f"power+const not tried: AICc needs {MIN_POINTS_CONST} points, got {n}")
    else:
        pc = _fit_power_const(x, y, L, alpha)
        if pc is None:
            notes.append("power+const did not converge")
        else:
            a2, alpha2, e2, rss2, ci2 = pc
            aicc["power+const"] = _aicc(rss2, n, 4)
            if aicc["power+const"] < aicc["power"] - AICC_MARGIN:
                chosen = PowerLawFit("power+const", alpha2, ci2, a2, e2, n, trend, alpha, ci, aicc, rss2)
    return PowerLawFit(**{**chosen.__dict__, "aicc": aicc, "note": "; ".join(notes)})


def fit_or_reason(pairs_seen: Iterable[float], loss: Iterable[float], *, name: str = "curve"
                  ) -> tuple[PowerLawFit | None, str]:
    """fit_power_law, or (None, the one-line reason) for a curve that cannot be fitted (a report shows both)."""
    try:
        return fit_power_law(pairs_seen, loss, name=name), ""
    except FitError as e:
        return None, str(e)


def fit_curves(curves: dict) -> dict[str, tuple[PowerLawFit | None, str]]:
    """{name: (fit or None, reason when None)} of eval_curve.Curve objects (their pairs_seen and values)."""
    return {name: fit_or_reason(c.pairs_seen, c.values, name=name) for name, c in curves.items()}


CRITERION = ("L(D) = (D_c/D)^alpha, or + E where AICc prefers it by more than 2 (least squares on log L); "
             "alpha's 95% interval from the fit's covariance; flat: the log-log slope's 95% interval contains 0")
