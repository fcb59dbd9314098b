"""The closed loop's figures (jobs.loop runs the rounds): per round and arm, the world's true CTR of
the served slates and their exposure concentration; the table with the lifts against round 1,
its markdown and the plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from abtest.analysis import exposure_concentration, true_ctr


def round_metrics(world, events: pd.DataFrame, arms: list[str], catalogue: np.ndarray) -> dict[str, dict[str, float]]:
    """Per arm: the world's true CTR of its impressions and their concentration (abtest/analysis.py)."""
    out = {}
    for a in arms:
        ev = events[events["arm"] == a]
        imp = ev[ev["event"] == "impression"]
        out[a] = {"true_ctr": true_ctr(world, ev), **exposure_concentration(imp["item_id"].to_numpy(), catalogue)}
    return out


def table(rounds: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per (round, arm), with the lifts against round 1 of the same arm."""
    rows = [{"round": x["round"], "arm": a, **m} for x in rounds for a, m in x["arms"].items()]
    df = pd.DataFrame(rows)
    first = df[df["round"] == df["round"].min()].set_index("arm")
    for c in ("ctr", "true_ctr"):
        df[f"{c}_vs_round1"] = df[c] / df["arm"].map(first[c]) - 1
    return df


def plot(df: pd.DataFrame, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [("ctr", "logged CTR"), ("true_ctr", "world's true CTR"), ("gini", "Gini of item exposures"),
            ("top1_share", "top-1% items' share"), ("coverage", "catalogue coverage")]
    fig, axes = plt.subplots(1, len(cols), figsize=(3.2 * len(cols), 3.2))
    for ax, (c, title) in zip(axes, cols, strict=True):
        for arm, g in df.groupby("arm"):
            ax.plot(g["round"], g[c], marker="o", label=arm)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("round")
        ax.set_xticks(sorted(df["round"].unique()))
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def round_summary(rounds: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per round: the A/B's decisive lift of the treatment over the control (the arms the A/B
    named, `x["treatment"]` / `x["control"]`) with its CI and p, the world's
    true-CTR ratio of the two arms in the same week (what the logged lift estimates, free of click
    noise), whether the treatment was promoted, and the versions that served it."""
    rows = []
    for x in rounds:
        lift = x.get("lift") or {}
        arms = x["arms"]
        t, c = (arms.get(x.get(k, k), {}).get("true_ctr", float("nan")) for k in ("treatment", "control"))
        pop = arms.get(x.get("popularity_arm") or x.get("control", "control"), {}).get("true_ctr", float("nan"))
        raw = x.get("lift_raw") or {}
        rows.append({"round": x["round"], "decided_on": x.get("decided_on") or "lift",
                     "ab_lift": lift.get("relative", float("nan")), "raw_lift": raw.get("relative", float("nan")),
                     "ci_low": lift.get("ci_low", float("nan")), "ci_high": lift.get("ci_high", float("nan")),
                     "p_value": lift.get("p_value", float("nan")), "true_ctr_lift": t / c - 1 if c else float("nan"),
                     "versus": x.get("control", "control"), "true_ctr_vs_popularity": t / pop - 1 if pop else float("nan"),
                     "promoted": bool(x["promote"]["promoted"]),
                     "treatment_versions": ", ".join(f"{k.removeprefix('funnel-')} v{v}"
                                                     for k, v in (x.get("treatment_versions") or {}).items())})
    return pd.DataFrame(rows)


def loop_markdown(df: pd.DataFrame, rounds: list[dict[str, Any]], seconds: float) -> str:
    cols = ["round", "arm", "impressions", "ctr", "true_ctr", "gini", "top1_share", "coverage", "ctr_vs_round1",
            "true_ctr_vs_round1"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---:|" * len(cols)]
    for row in df[cols].itertuples(index=False):
        lines.append("| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row) + " |")
    lines += ["", "| round | treatment vs | A/B lift, decisive (95% CI) | p | raw lift | true-CTR lift, same week "
              "| true-CTR lift vs popularity | promoted | treatment served by |", "|---:|---|---:|---:|---:|---:|---:|---|---|"]
    for r in round_summary(rounds).itertuples(index=False):
        est = "CUPED" if r.decided_on == "lift_cuped" else "raw"
        lines.append(f"| {r.round} | {r.versus} | {est} {r.ab_lift:+.2%} [{r.ci_low:+.2%}, {r.ci_high:+.2%}] | "
                     f"{r.p_value:.2g} | {r.raw_lift:+.2%} | {r.true_ctr_lift:+.2%} | {r.true_ctr_vs_popularity:+.2%} | "
                     f"{'yes' if r.promoted else 'no'} | {r.treatment_versions} |")
    gates = [f"round {x['round']}: {x['gate']}" for x in rounds if x.get("gate")]
    return (f"# Closed loop: {len(rounds)} rounds in {seconds / 60:.1f} min\n\n" + "\n".join(lines) + "\n"
            + ("\nGate decisions: " + "; ".join(gates) + "\n" if gates else ""))
