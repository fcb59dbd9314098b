"""Train/serve skew per model: test AUC on logged test rows built by the serving path vs the training path.

  python -m benchmarks.feature_skew --config configs/small.yaml [--rows 20000] [--alias champion]

The training path builds the ingest's logged test rows with the training batcher. The serving path
rebuilds the same (user, item, ts) rows the way the server does: the online state starts from a
snapshot at the start of the test period and the log after it is replayed through the online
updates, each request's rows built before its own events (serving/parity.py). Every registered
ranking model trained on this data (funnel-<name> at `--alias`, else its latest version trained on
it) scores both; the table gives each model's two AUCs, their difference and the largest difference
of one probability. The same check runs on the tiny world in `make test`
(tests/data/test_feature_parity.py). Writes JSON (`--out`).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch


def registered_rankers(alias: str, fingerprint: str) -> dict[str, str]:
    """{model name: models:/ URI} of the registry's ranking models (funnel-<name>) trained on the data
    with this fingerprint: the version at `alias` if it was, else the latest one that was (a closed
    loop registers versions trained on later ingests, whose train split covers this test period)."""
    import mlflow

    from models.registry import RANKING

    client = mlflow.MlflowClient()
    out = {}
    for rm in client.search_registered_models():
        name = rm.name.removeprefix("funnel-")
        base = (name.split("-", 1)[1] if name.startswith("adaf2m2-") else name).replace("-", "_")  # mean-pool
        if base not in RANKING:
            continue
        ok = {int(v.version): v for v in client.search_model_versions(f"name='{rm.name}'")
              if client.get_run(v.run_id).data.tags.get("dataset_fingerprint") == fingerprint}
        if not ok:
            continue
        try:
            version = int(client.get_model_version_by_alias(rm.name, alias).version)
        except Exception:
            version = -1
        out[name] = f"models:/{rm.name}/{version if version in ok else max(ok)}"
    return out


def main(argv: list[str] | None = None) -> int:
    from jobs.common import config_parser, load
    from pipeline.ingest import user_pass_local
    from pipeline.readers import RawTables
    from pipeline.simulator import simulate_local
    from serving.parity import first_requests, replay_served_batch
    from training.batches import RankingBatcher
    from training.metrics import auc
    from training.registry import load_model, setup_tracking

    p = config_parser(__doc__)
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--alias", default="champion")
    p.add_argument("--out", default="benchmarks/out/feature_skew.json")
    a = p.parse_args(argv)
    cfg = load(a)
    if cfg.data.source != "simulator":
        raise SystemExit("feature_skew replays the simulator's log; data.source must be simulator")
    torch.set_num_threads(2)
    root = Path(cfg.data.output)
    setup_tracking(cfg.tracking)
    t0 = time.time()
    ev, items, users = simulate_local(cfg.world)
    up = user_pass_local(cfg, ev, RawTables(None, items, users, True, "simulator"))
    test = first_requests(pd.read_parquet(root / "ranking" / "split=test"), a.rows)
    d = cfg.data
    fingerprint = json.loads((root / "stats.json").read_text())["fingerprint"]
    uris = registered_rankers(a.alias, fingerprint)
    if not uris:
        raise SystemExit(f"no ranking model trained on {root} (fingerprint {fingerprint}) under {cfg.tracking.uri}; "
                         "run `make demo` first")
    rows, built = [], {}
    for name, uri in sorted(uris.items()):
        model = load_model(uri).eval()
        L = model.spec.seq_len
        if L not in built:  # one replay per history length
            serving, store = replay_served_batch(root, up.p1, up.t_test, test, d.ctr_prior_strength, d.long_len,
                                                 d.short_len, L, progress=sys.stderr.isatty())
            built[L] = (RankingBatcher(store.spec, store.history, L)({c: test[c].to_numpy() for c in test.columns}),
                        serving)
        training, serving = built[L]
        with torch.inference_mode():
            pt = torch.sigmoid(model(training).logits.float()).numpy()
            ps = torch.sigmoid(model(serving).logits.float()).numpy()
        y = test["label"].to_numpy()
        same = {k: bool(torch.equal(training[k], serving[k])) if not training[k].is_floating_point()
                else bool(torch.allclose(training[k], serving[k], rtol=0, atol=1e-6))
                for k in training if k != "label"}
        rows.append({"model": name, "uri": uri, "rows": len(test), "auc_training_path": auc(y, pt),
                     "auc_serving_path": auc(y, ps), "auc_diff": auc(y, ps) - auc(y, pt),
                     "max_abs_prob_diff": float(np.abs(ps - pt).max()),
                     "fields_equal": int(sum(same.values())), "fields": len(same),
                     "unequal": [k for k, v in same.items() if not v]})
    df = pd.DataFrame(rows)
    print(f"\n### Train/serve skew: {len(test):,} logged test rows ({test['ts'].min()}–{test['ts'].max()}), "
          f"{time.time() - t0:.0f} s\n")
    shown = df.drop(columns=["uri", "unequal"])
    print("| " + " | ".join(shown.columns) + " |\n|" + "---|" * len(shown.columns))
    for row in shown.itertuples(index=False):
        print("| " + " | ".join(f"{v:.6f}" if isinstance(v, float) else str(v) for v in row) + " |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"config": a.config, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
