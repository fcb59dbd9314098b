"""The A/B's analysis, from the served event log (abtest/traffic.py drives the traffic).

Analysis (vectorised over users, the randomisation unit — buckets are per user):
- per arm: users, requests, impressions, clicks, CTR = Σclicks / Σimpressions, clicks per request;
- relative lift of CTR (treatment vs control) with a 95% CI by the delta method for ratio
  metrics over user-level sums (Deng, Knoblich & Lu 2018), computed on the log scale;
- sample-ratio mismatch: a χ² test of users per arm against the configured shares;
- CUPED (Deng, Xu, Kohavi & Walker 2013), when a pre-experiment covariate is given: each
  user's CTR in the logs before the test. The per-user linearised CTR of each arm is
  adjusted by θ·(X − X̄), θ pooled over both arms; X is fixed before assignment, so the
  estimate stays unbiased and only its variance shrinks (by about corr(X, Y)²). Reported
  beside the raw lift; `abtest.cuped` decides which one promotion reads.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats


@dataclass
class ArmStats:
    arm: str
    users: int
    requests: int
    impressions: int
    clicks: int
    ctr: float
    ctr_se: float
    clicks_per_request: float


def _ratio_se(num: np.ndarray, den: np.ndarray) -> float:
    """SE of Σnum/Σden over i.i.d. units (delta method)."""
    n = len(num)
    if n < 2 or den.sum() == 0:
        return float("nan")
    mx, my = num.mean(), den.mean()
    vx, vy = num.var(ddof=1), den.var(ddof=1)
    cxy = np.cov(num, den, ddof=1)[0, 1]
    var = (vx / my**2 - 2 * mx * cxy / my**3 + mx**2 * vy / my**4) / n
    return float(math.sqrt(max(var, 0.0)))


def _relative(t_ctr: float, t_se: float, c_ctr: float, c_se: float, alpha: float) -> dict[str, float]:
    """Relative lift t/c − 1 with a CI computed on the log scale (delta method)."""
    log_ratio = math.log(t_ctr / c_ctr)
    se = math.sqrt((t_se / t_ctr) ** 2 + (c_se / c_ctr) ** 2)
    z = stats.norm.ppf(1 - alpha / 2)
    return {"relative": math.exp(log_ratio) - 1, "ci_low": math.exp(log_ratio - z * se) - 1,
            "ci_high": math.exp(log_ratio + z * se) - 1,
            "p_value": float(2 * stats.norm.sf(abs(log_ratio / se))) if se > 0 else float("nan")}


def cuped(per_user: pd.DataFrame, covariate: pd.Series, control: str, treatment: str,
          alpha: float = 0.05) -> dict[str, float] | None:
    """CUPED-adjusted relative lift of CTR. per_user: arm, user_id, clicks, imps; covariate:
    a pre-experiment value per user_id (missing → its mean). Per arm, the linearised CTR
    L = (c − R·n) / n̄ (R = Σc/Σn) has mean 0 and Var(R̂) = Var(L)/N; the adjusted estimate is
    R − θ(X̄_arm − X̄) with θ = Σ cov(L, X) / Σ var(X) over the arms, and Var = Var(L − θX)/N."""
    x_all = covariate.reindex(per_user["user_id"].to_numpy()).to_numpy(float)
    if np.isnan(x_all).all():
        return None
    x_all = np.where(np.isnan(x_all), np.nanmean(x_all), x_all)
    parts = {}
    for arm in (control, treatment):
        m = (per_user["arm"] == arm).to_numpy()
        c, n, x = per_user["clicks"].to_numpy(float)[m], per_user["imps"].to_numpy(float)[m], x_all[m]
        if len(c) < 2 or n.sum() == 0:
            return None
        r = c.sum() / n.sum()
        parts[arm] = (r, (c - r * n) / n.mean(), x)
    cov = sum(np.cov(lin, x, ddof=1)[0, 1] for _, lin, x in parts.values())
    var = sum(x.var(ddof=1) for _, _, x in parts.values())
    if var <= 0:
        return None
    theta = cov / var
    x_bar = x_all[np.isin(per_user["arm"].to_numpy(), [control, treatment])].mean()
    adj = {}
    for arm, (r, lin, x) in parts.items():
        adj[arm] = (r - theta * (x.mean() - x_bar), float(np.sqrt((lin - theta * x).var(ddof=1) / len(lin))),
                    float(np.sqrt(lin.var(ddof=1) / len(lin))))
    (tc, tse, tse_raw), (cc, cse, cse_raw) = adj[treatment], adj[control]
    if tc <= 0 or cc <= 0:
        return None
    out = _relative(tc, tse, cc, cse, alpha)
    raw_var = (tse_raw / parts[treatment][0]) ** 2 + (cse_raw / parts[control][0]) ** 2
    out |= {"theta": float(theta), "variance_reduction": float(1 - ((tse / tc) ** 2 + (cse / cc) ** 2) / raw_var),
            "treatment_ctr": float(tc), "control_ctr": float(cc)}
    return out


def analyse(events: pd.DataFrame, shares: dict[str, int], control: str, treatment: str,
            alpha: float = 0.05, covariate: pd.Series | None = None, decide_on_cuped: bool = True) -> dict[str, Any]:
    """events: the served event log (impressions and clicks with arm and request_id);
    covariate: a pre-experiment value per user_id (CUPED), e.g. `pre_period_ctr`."""
    ev = events.copy()
    ev["click"] = (ev["event"] == "click").astype(np.int64)
    ev["imp"] = (ev["event"] == "impression").astype(np.int64)
    per_user = ev.groupby(["arm", "user_id"]).agg(clicks=("click", "sum"), imps=("imp", "sum"),
                                                  requests=("request_id", "nunique")).reset_index()
    arms: dict[str, ArmStats] = {}
    for arm, g in per_user.groupby("arm"):
        c, n = g["clicks"].to_numpy(float), g["imps"].to_numpy(float)
        req = int(ev.loc[(ev["arm"] == arm) & (ev["event"] == "impression"), "request_id"].nunique())
        arms[arm] = ArmStats(arm, len(g), req, int(n.sum()), int(c.sum()), float(c.sum() / max(n.sum(), 1)),
                             _ratio_se(c, n), float(c.sum() / max(req, 1)))
    out: dict[str, Any] = {"arms": {a: asdict(s) for a, s in arms.items()}, "control": control,
                           "treatment": treatment, "alpha": alpha}
    # sample-ratio mismatch over users
    names = [a for a in shares if shares[a] > 0]
    observed = np.array([arms[a].users if a in arms else 0 for a in names], dtype=float)
    expected = observed.sum() * np.array([shares[a] for a in names], dtype=float) / sum(shares[a] for a in names)
    chi2, p_srm = stats.chisquare(observed, expected) if observed.sum() else (float("nan"), float("nan"))
    out["srm"] = {"chi2": float(chi2), "p_value": float(p_srm), "mismatch": bool(p_srm < 0.001),
                  "observed": dict(zip(names, observed.tolist(), strict=True)),
                  "expected": dict(zip(names, expected.tolist(), strict=True))}
    out["lift"] = out["lift_cuped"] = None
    if control in arms and treatment in arms and arms[control].ctr > 0 and arms[treatment].ctr > 0:
        t, c = arms[treatment], arms[control]
        out["lift"] = _relative(t.ctr, t.ctr_se, c.ctr, c.ctr_se, alpha)
        if covariate is not None:
            out["lift_cuped"] = cuped(per_user, covariate, control, treatment, alpha)
    use_cuped = decide_on_cuped and out["lift_cuped"] is not None
    out["decided_on"] = "lift_cuped" if use_cuped else "lift"
    decisive = out[out["decided_on"]]
    out["significant_positive"] = bool(decisive is not None and decisive["ci_low"] > 0 and not out["srm"]["mismatch"])
    return out


def decision_arms(variants: dict[str, str]) -> tuple[str, str, str]:
    """(control, treatment, popularity arm) of the promotion decision, from what each arm serves. The
    treatment is the arm on `funnel@challenger` (else the first arm that is not the popularity arm);
    the control is the arm on `funnel@champion` when there is one — promotion moves `challenger` to
    `champion`, so the challenger must beat the funnel it would replace — else the popularity arm
    (the first arm when none serves popularity)."""
    arms = list(variants)
    pop = next((a for a in arms if variants[a] == "popularity"), arms[0])
    treatment = next((a for a in arms if variants[a] == "funnel@challenger"), next(a for a in arms if a != pop))
    control = next((a for a in arms if variants[a] == "funnel@champion" and a != treatment), pop)
    return control, treatment, pop


def compare_arms(events: pd.DataFrame, shares: dict[str, int], variants: dict[str, str], alpha: float = 0.05,
                 covariate: pd.Series | None = None) -> dict[str, Any]:
    """`analyse` with the arms of `decision_arms`; when the decision's control is the champion, the
    treatment against the popularity arm too, under "vs_popularity" (the floor, reported, not decisive)."""
    control, treatment, pop = decision_arms(variants)
    res = analyse(events, shares, control, treatment, alpha, covariate)
    res["popularity_arm"] = pop
    if control != pop:
        floor = analyse(events, shares, pop, treatment, alpha, covariate)
        res["vs_popularity"] = {k: floor[k] for k in ("control", "treatment", "lift", "lift_cuped", "decided_on",
                                                      "significant_positive")}
    return res


def pre_period_ctr(data_dir: str | Path, prior: float = 20.0) -> pd.Series:
    """Each user's CTR over the logged impressions (sampled negatives excluded), shrunk toward
    the overall CTR by `prior` impressions: the CUPED covariate, indexed by user_id. Empty
    for logs without impressions (then there is no CUPED)."""
    root = Path(data_dir)
    rows = pd.read_parquet(root / "ranking", columns=["label", "user_key", "is_sampled_negative"])
    rows = rows[rows["is_sampled_negative"] == 0]
    users = pd.read_parquet(root / "users.parquet", columns=["user_id", "user_key"])
    if rows.empty:
        return pd.Series(dtype=float)
    g = rows.groupby("user_key")["label"].agg(["sum", "size"])
    p = float(rows["label"].mean())
    ctr = (g["sum"] + prior * p) / (g["size"] + prior)
    return pd.Series(ctr.reindex(users["user_key"].to_numpy()).to_numpy(float),
                     index=users["user_id"].astype(str).to_numpy()).dropna()


def report_markdown(res: dict[str, Any]) -> str:
    lines = ["# Simulated A/B", "", "| arm | users | requests | impressions | clicks | CTR (± 95% CI) | clicks/request |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for a, s in res["arms"].items():
        lines.append(f"| {a} | {s['users']:,} | {s['requests']:,} | {s['impressions']:,} | {s['clicks']:,} | "
                     f"{s['ctr']:.4f} ± {1.96 * s['ctr_se']:.4f} | {s['clicks_per_request']:.3f} |")
    lift, cu = res.get("lift"), res.get("lift_cuped")
    lines.append("")
    if lift:
        lines.append(f"Lift of CTR, {res['treatment']} vs {res['control']}: **{lift['relative']:+.2%}** "
                     f"(95% CI {lift['ci_low']:+.2%} … {lift['ci_high']:+.2%}, p = {lift['p_value']:.2g}).")
    if cu:
        lines.append(f"CUPED (covariate: each user's CTR in the logs before the test; θ = {cu['theta']:.3f}, "
                     f"variance −{cu['variance_reduction']:.0%}): **{cu['relative']:+.2%}** "
                     f"(95% CI {cu['ci_low']:+.2%} … {cu['ci_high']:+.2%}, p = {cu['p_value']:.2g}).")
    floor = res.get("vs_popularity")
    if floor and floor.get("lift"):
        f_lift, f_cu = floor["lift"], floor.get("lift_cuped")
        lines.append(f"Against the floor, {floor['treatment']} vs {floor['control']} (popularity): "
                     f"{f_lift['relative']:+.2%} (95% CI {f_lift['ci_low']:+.2%} … {f_lift['ci_high']:+.2%})"
                     + (f", CUPED {f_cu['relative']:+.2%} (95% CI {f_cu['ci_low']:+.2%} … {f_cu['ci_high']:+.2%})"
                        if f_cu else "") + "; reported, not decisive: the challenger is decided against the champion.")
    srm = res["srm"]
    lines.append(f"Sample-ratio check: χ² = {srm['chi2']:.2f}, p = {srm['p_value']:.3g} → "
                 f"{'MISMATCH: do not trust this test' if srm['mismatch'] else 'no mismatch'}.")
    lines.append(f"Decision input ({'CUPED' if res.get('decided_on') == 'lift_cuped' else 'raw'} lift): "
                 f"significant positive lift = **{res['significant_positive']}**.")
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], events: pd.DataFrame, path: str | Path) -> Path:
    """Left: CTR per arm with 95% CIs. Right: cumulative CTR per arm over the test's requests."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    names = list(res["arms"])
    ctr = [res["arms"][a]["ctr"] for a in names]
    err = [1.96 * res["arms"][a]["ctr_se"] for a in names]
    a1.bar(names, ctr, yerr=err, capsize=6, color=["#999999", "#2a7ab9", "#d98b2b"][: len(names)])
    a1.set_ylabel("CTR")
    lift = res.get("lift")
    a1.set_title(f"{res['treatment']} vs {res['control']}: {lift['relative']:+.1%} "
                 f"[{lift['ci_low']:+.1%}, {lift['ci_high']:+.1%}]" if lift else "CTR", fontsize=10)
    ev = events.sort_values("ts", kind="stable")
    for a in names:
        g = ev[ev["arm"] == a]
        clicks = (g["event"] == "click").cumsum().to_numpy()
        imps = (g["event"] == "impression").cumsum().to_numpy()
        keep = imps > 0
        a2.plot(np.arange(len(g))[keep], clicks[keep] / imps[keep], label=a)
    a2.set_xlabel("logged events (time order)")
    a2.set_ylabel("cumulative CTR")
    a2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


# --------------------------------------------------------------------------- exposure and ground truth


def exposure_concentration(item_ids: np.ndarray, catalogue: np.ndarray) -> dict[str, float]:
    """How concentrated one arm's exposures are over the catalogue (every item that could be shown,
    unexposed ones counting as 0): the Gini coefficient of exposures per item, the share of exposures
    the top 1% of items take, and coverage = the share of the catalogue exposed at least once."""
    catalogue = np.unique(np.asarray(catalogue).astype(str))
    counts = pd.Series(np.asarray(item_ids).astype(str)).value_counts()
    x = np.sort(counts.reindex(catalogue, fill_value=0).to_numpy(np.float64))  # ascending
    n, total = len(x), x.sum()
    if n == 0 or total == 0:
        return {"gini": float("nan"), "top1_share": float("nan"), "coverage": 0.0}
    gini = float((2 * np.arange(1, n + 1) - n - 1) @ x / (n * total))
    top = max(1, int(np.ceil(0.01 * n)))
    return {"gini": gini, "top1_share": float(x[-top:].sum() / total), "coverage": float((x > 0).mean())}


def true_ctr(world, events: pd.DataFrame) -> float:
    """The world's expected CTR of the served impressions: mean P(click | user, item, position, ts) under
    the same click model that answered the test (pipeline/world.py), free of click noise."""
    imp = events[events["event"] == "impression"]
    if imp.empty:
        return float("nan")
    p = world.click_probabilities(imp["user_id"].astype(np.int64).to_numpy(), imp["item_id"].astype(np.int64).to_numpy(),
                                  imp["position"].astype(np.int64).to_numpy(), imp["ts"].astype(np.int64).to_numpy())
    return float(np.mean(p))


def served_versions(events, arm: str) -> dict[str, Any]:
    """The model versions that served `arm`, from its logged exposures (never from the alias,
    which may have moved during the test): `treatment_version_sets` lists every distinct set;
    `treatment_versions` is {registered name: version} when exactly one set served throughout,
    else {} (promotion then refuses)."""
    imp = events[(events["event"] == "impression") & (events["arm"] == arm)]
    sets = sorted({str(v) for v in imp["model_versions"].fillna("")}) if "model_versions" in imp else []
    one = {}
    if len(sets) == 1 and sets[0]:
        one = dict(x.rsplit("/", 1) for x in sets[0].split(","))
    return {"treatment_version_sets": sets, "treatment_versions": one}
