"""How much CTR could the funnel win? The world's own click model scores slates offline.

  python -m benchmarks.ab_headroom --config configs/small.yaml [--users 60] [--alias challenger]

For simulated users at random times of the A/B horizon, the mean true click probability
(positions 0..9, the world's position bias included) of four slates of 10: the popularity
arm's (most clicked items of the log), the registered ranker's top 10 over the whole
catalogue, the registered pre-ranker's (LREA) top 10, and the oracle's (the world's own
top 10 for that user and time). A ranker no better than popularity here cannot win the
A/B, whatever the retrieval stage does. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from configs import load_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/small.yaml")
    p.add_argument("--users", type=int, default=60)
    p.add_argument("--alias", default="challenger")
    p.add_argument("--out", default="benchmarks/out/ab_headroom.json")
    a = p.parse_args(argv)
    from pipeline.world import get_world
    from serving.features import FeatureStore
    from training.registry import load_model, registered_name, setup_tracking

    cfg = load_config(a.config)
    setup_tracking(cfg.tracking)
    world, store = get_world(cfg.world), FeatureStore(cfg.data.output)
    models = {f"{m} top 10": load_model(f"models:/{registered_name(m)}@{a.alias}")
              for m in (cfg.serve.ranker, cfg.serve.preranker)}
    keys = np.arange(1, len(store.item_id))
    known = np.array([x is not None for x in store.item_id[keys]])
    keys = keys[known]
    ids = np.array([int(x) for x in store.item_id[keys]])
    pop = np.array([int(x) for x in store.item_ids(store.popular[:10])])
    users = world.users_table()
    users = users[users["registered_ts"] < world.log_end_ts]["user_id"].to_numpy()
    rng = np.random.default_rng(0)
    pos = np.arange(10)
    rows: dict[str, list[float]] = {"popularity": [], **{k: [] for k in models}, "oracle (world's top 10)": []}
    for u in rng.choice(users, min(a.users, len(users)), replace=False):
        ts = int(rng.integers(world.log_end_ts, world.ab_end_ts))
        ctr = lambda items: float(world.click_probabilities(np.full(10, u), items, pos, np.full(10, ts)).mean())  # noqa: E731, B023
        rows["popularity"].append(ctr(pop))
        p_all = world.click_probabilities(np.full(len(ids), u), ids, np.zeros(len(ids)), np.full(len(ids), ts))
        rows["oracle (world's top 10)"].append(ctr(ids[np.argsort(-p_all)[:10]]))
        uk = int(store.user_keys([str(u)])[0])
        hist = store.user_history(uk)
        for name, m in models.items():
            with torch.inference_mode():
                s = m(store.ranking_batch(uk, hist, keys, ts, seq_len=m.spec.seq_len)).logits.float().numpy()
            rows[name].append(ctr(ids[np.argsort(-s)[:10]]))
    out = {k: {"mean_ctr": float(np.mean(v)), "se": float(np.std(v, ddof=1) / np.sqrt(len(v)))} for k, v in rows.items()}
    print(f"{'slate':<28}{'mean true CTR':>15}{'± se':>9}{'vs popularity':>15}")
    for k, v in out.items():
        print(f"{k:<28}{v['mean_ctr']:>15.4f}{v['se']:>9.4f}{v['mean_ctr'] / out['popularity']['mean_ctr'] - 1:>+15.1%}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"users": a.users, "alias": a.alias, "slates": out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
