"""Promotion by registry aliases: `challenger` becomes `champion` only on a significant positive A/B lift
(`python -m jobs.promote` runs it on the last A/B).

Policy (DESIGN.md): a trained model became `challenger` through the offline gate; it
moves to `champion` only when the simulated A/B's lift is positive with its 95% CI above
zero and no sample-ratio mismatch. Every model of the treatment funnel (retriever,
pre-ranker, ranker) moves together; each version records the evidence (A/B run, lift, CI,
previous champion) as tags, promoted or not. The versions promoted are exactly the ones the
A/B's exposures record for the treatment arm (its `treatment_versions`), even if
`challenger` has moved since; if more than one set of versions served it during the test
(an alias moved mid-test), or the record is missing, nothing is promoted.
"""

from __future__ import annotations

from typing import Any

from configs import FunnelConfig


def promote(cfg: FunnelConfig, ab: dict[str, Any]) -> dict[str, Any]:
    import mlflow
    from mlflow.exceptions import MlflowException

    from training.registry import registered_name, setup_tracking

    setup_tracking(cfg.tracking)
    client = mlflow.MlflowClient()
    sets = ab.get("treatment_version_sets")
    tested_all = ab.get("treatment_versions") or {}
    one_set = bool(tested_all) and (sets is None or len(sets) == 1)
    ok = bool(ab.get("significant_positive")) and one_set
    why_not = ("lift not significantly positive (or SRM)" if one_set else
               f"the treatment arm was not served by one set of model versions throughout the test: {sets}")
    decided_on = ab.get("decided_on", "lift")  # the raw lift, or the CUPED-adjusted one (abtest/analysis.py)
    lift = ab.get(decided_on) or {}
    evidence = {"abtest_run_id": ab.get("run_id", ""), "lift": f"{lift.get('relative', float('nan')):+.4f}",
                "ci": f"[{lift.get('ci_low', float('nan')):+.4f}, {lift.get('ci_high', float('nan')):+.4f}]",
                "p_value": f"{lift.get('p_value', float('nan')):.4g}", "estimator": decided_on,
                "srm_mismatch": str(ab.get("srm", {}).get("mismatch"))}
    served = {}  # registered name → the version the A/B served (None: not on record); all move or none
    for model in (cfg.serve.retriever, cfg.serve.preranker, cfg.serve.ranker):
        name = registered_name(model)
        tested = str(tested_all.get(name, "?"))
        try:
            served[name] = client.get_model_version(name, tested) if tested.isdigit() else None
        except MlflowException:
            served[name] = None
    if any(v is None for v in served.values()):
        ok, why_not = False, f"a model of the funnel has no served version on record ({why_not})"
    moves = {}
    for name, ch in served.items():
        if ch is None:
            moves[name] = {"promoted": False, "reason": why_not}
            continue
        try:
            prev = client.get_model_version_by_alias(name, "champion").version
        except MlflowException:
            prev = ""
        decision = {"promoted": ok, "version": ch.version, "previous_champion": prev,
                    "reason": "significant positive lift" if ok else why_not}
        if ok:
            client.set_registered_model_alias(name, "champion", ch.version)
        for k, v in (evidence | decision).items():
            client.set_model_version_tag(name, ch.version, f"promotion.{k}", str(v))
        moves[name] = decision
    return {"promoted": ok, **evidence, "models": moves}


def champion_arms(abtest, champion_arm: str = "champion"):
    """The A/B's arms and variants with one more arm on `funnel@champion`: half of the popularity arm's
    buckets, placed right after it, so every other arm keeps its users (ArmRouter gives buckets in arm
    order). What the closed loop runs once a champion exists: promotion then asks whether the
    challenger beats the champion, not only popularity (abtest.analysis.decision_arms)."""
    import dataclasses

    from abtest.analysis import decision_arms

    variants = {a: abtest.variants.get(a, "popularity") for a in abtest.arms}
    if "funnel@champion" in variants.values():
        return abtest
    pop = decision_arms(variants)[2]
    if variants[pop] != "popularity" or abtest.arms[pop] < 2 or champion_arm in abtest.arms:
        raise ValueError(f"abtest.arms {abtest.arms}: a champion arm needs a popularity arm of >= 2 buckets "
                         f"to split, and no arm named {champion_arm!r}")
    arms: dict[str, int] = {}
    for a, share in abtest.arms.items():
        if a == pop:
            arms[a] = share - share // 2
            arms[champion_arm] = share // 2
        else:
            arms[a] = share
    return dataclasses.replace(abtest, arms=arms, variants={**variants, champion_arm: "funnel@champion"})


def has_champion(cfg: FunnelConfig) -> bool:
    """Whether every model of the served funnel has a `champion` version in the registry."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from training.registry import registered_name, setup_tracking

    setup_tracking(cfg.tracking)
    client = mlflow.MlflowClient()
    try:
        for m in (cfg.serve.retriever, cfg.serve.preranker, cfg.serve.ranker):
            client.get_model_version_by_alias(registered_name(m), "champion")
    except MlflowException:
        return False
    return True
