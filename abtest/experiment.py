"""One simulated A/B, end to end: traffic (abtest/traffic.py) → the served event log → analysis
(abtest/analysis.py): CTR and clicks per request per arm, the lift with a 95% CI, a sample-ratio
check, and the lift again with CUPED (each user's pre-test CTR in the logs as covariate;
`abtest.cuped`, which promotion then reads) → report (markdown + PNG under runs/abtest/) and the
numbers in an MLflow run "abtest".
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from abtest.analysis import compare_arms, plot, pre_period_ctr, report_markdown, served_versions
from abtest.traffic import simulate
from configs import FunnelConfig


def run_abtest(cfg: FunnelConfig, url: str, data_dir: str | None = None,
               horizon: tuple[int, int] | None = None) -> dict[str, Any]:
    """The A/B against the funnel served at `url` (`simulate` inside `horizon`), its analysis, report
    and MLflow run; `res["request_ids"]` names this test's rows of the event log.

    `data_dir` (default data.output) is where CUPED's covariate comes from: each user's CTR in those
    logs. It must hold no traffic of this experiment's arms: a covariate measured after assignment
    carries the treatment's effect and biases the adjusted lift toward zero (jobs.loop passes the
    logs from before its first round; its later rounds' ingests hold the earlier rounds' A/Bs)."""
    import mlflow

    from serving.router import read_events
    from training.registry import setup_tracking

    log_dir = Path(cfg.serve.event_log)
    t0 = time.time()
    sent = simulate(cfg, url, horizon)
    # this test's rows only; the log keeps every earlier one (served traffic is training data)
    request_ids = sent.pop("request_ids")
    events = read_events(log_dir)
    events = events[events["request_id"].isin(set(request_ids))].reset_index(drop=True)
    variants = {a: cfg.abtest.variants.get(a, "popularity") for a in cfg.abtest.arms}  # as the ingress reads them
    covariate_data = str(data_dir or cfg.data.output)
    covariate = pre_period_ctr(covariate_data) if cfg.abtest.cuped else None
    # the challenger against the champion when an arm serves it, else against popularity (decision_arms)
    res = compare_arms(events, cfg.abtest.arms, variants, cfg.abtest.alpha, covariate=covariate)
    treatment = res["treatment"]
    res |= {"sent": sent, "seconds": time.time() - t0, "variants": cfg.abtest.variants,
            "covariate_data": covariate_data if covariate is not None else None}
    exp = setup_tracking(cfg.tracking)
    res |= served_versions(events, treatment)
    versions = res["treatment_versions"]
    md = report_markdown(res)
    out = Path("runs") / "abtest"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as d, mlflow.start_run(experiment_id=exp, run_name="abtest") as run:
        (Path(d) / "abtest.md").write_text(md)
        (Path(d) / "abtest.json").write_text(json.dumps(res, indent=2, default=str))
        plot(res, events, Path(d) / "abtest.png")
        mlflow.log_artifacts(d)
        shutil.copyfile(Path(d) / "abtest.png", out / "last.png")  # the same report, kept beside the run
        for a, s in res["arms"].items():
            mlflow.log_metrics({f"{a}_ctr": s["ctr"], f"{a}_clicks_per_request": s["clicks_per_request"],
                                f"{a}_users": s["users"]})
        if res["lift"]:
            mlflow.log_metrics({f"lift_{k}": v for k, v in res["lift"].items()})
        if res["lift_cuped"]:
            mlflow.log_metrics({f"lift_cuped_{k}": v for k, v in res["lift_cuped"].items()})
        mlflow.set_tags({"srm_mismatch": str(res["srm"]["mismatch"]), "variants": json.dumps(cfg.abtest.variants),
                         **{f"version.{k}": v for k, v in versions.items()}})
        res["run_id"] = run.info.run_id
    (out / "last.json").write_text(json.dumps(res, indent=2, default=str))
    (out / "last.md").write_text(md)
    print(md, flush=True)
    return res | {"request_ids": request_ids}
