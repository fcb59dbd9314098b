"""Which inputs make a ranker that serves well? Offline AUC against the world's own verdict.

  python -m benchmarks.served_inputs --config configs/small.yaml [--model cdnet] [--users 200]
                                     [--variants all,no_item_ctr,no_item_counters] [--train-rows 0]

A ranker is judged twice: offline, by its AUC on the logged test impressions, and as it is
served, by the world's true CTR of its top k over the whole catalogue at A/B-time requests
(the users and request times of `jobs.abtest`, positions 0..k-1). A logged input can raise the
first and lower the second: an item's logged CTR is the CTR of the users the logging policy
chose to show the item to (interest-based slates show an item to its fans), not its CTR for the
user at hand. The report measures that confounding directly too — per item, the rank correlation
of its logged CTR (as serving reads it, the last logged value) with its true CTR over its logged
audience and over all users — and then fits `--model` once per input variant (the same seed,
lr and budget) and prints both verdicts side by side with popularity and the world's top k.

Variants: all (the ingest's inputs), no_item_ctr, no_item_counters (item exposures, clicks and
CTR), no_counters (every user and item counter). Writes JSON (`--out`).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

ITEM_COUNTERS = ("item_exposures_before", "item_clicks_before", "item_ctr")
USER_COUNTERS = ("user_exposures_before", "user_clicks_before", "user_ctr")
VARIANTS = {
    "all": (),
    "no_item_ctr": ("item_ctr",),
    "no_item_counters": ITEM_COUNTERS,
    "no_counters": ITEM_COUNTERS + USER_COUNTERS,
}


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy()
    return float(np.corrcoef(ra, rb)[0, 1])


def confounding(world, store, root: Path, n_users: int, seed: int) -> dict[str, float]:
    """Per logged item (≥ 20 impressions): Spearman of its logged CTR (the last logged value, as
    served) with (a) its true CTR over the impressions it was logged with (the same users,
    positions and times: what the logged CTR estimates) and (b) its true CTR at position 0 for
    `n_users` random users at the log's end (what serving needs: an item's CTR for anyone)."""
    cols = ["user_key", "item_key", "position", "ts", "label"]
    rows = pd.concat([pd.read_parquet(root / "ranking" / f"split={s}", columns=cols) for s in ("train", "val", "test")])
    rows = rows[rows["position"] > 0]  # logged impressions (the ingest's position is 1-based, 0 = none)
    user_id = np.zeros(int(store._user_keys.max()) + 1, dtype=np.int64)
    user_id[store._user_keys] = store._user_index.to_numpy().astype(np.int64)
    item_id = np.array([int(x) for x in store.item_ids(rows["item_key"].to_numpy())])
    p = world.click_probabilities(user_id[rows["user_key"].to_numpy(np.int64)], item_id,
                                  rows["position"].to_numpy(np.int64) - 1, rows["ts"].to_numpy(np.int64))
    g = pd.DataFrame({"item_key": rows["item_key"].to_numpy(), "p": p, "y": rows["label"].to_numpy()})
    per = g.groupby("item_key").agg(n=("p", "size"), p_logged=("p", "mean"), ctr=("y", "mean"))
    per = per[per["n"] >= 20]
    keys = per.index.to_numpy(np.int64)
    users = world.users_table()["user_id"].to_numpy()
    users = np.random.default_rng(seed).choice(users, min(n_users, len(users)), replace=False)
    ids = np.array([int(x) for x in store.item_ids(keys)])
    uu, ii = np.repeat(users, len(ids)), np.tile(ids, len(users))
    p_all = world.click_probabilities(uu, ii, np.zeros(len(uu)), np.full(len(uu), world.log_end_ts))
    p_all = p_all.reshape(len(users), len(ids)).mean(0)
    served = store.item_num["item_ctr"][keys]
    return {"items": len(keys), "logged_ctr_vs_true_ctr_of_logged_audience": _spearman(served, per["p_logged"]),
            "logged_ctr_vs_true_ctr_of_all_users": _spearman(served, p_all),
            "true_ctr_logged_audience_vs_all_users": _spearman(per["p_logged"].to_numpy(), p_all),
            "clicks_vs_true_ctr_of_all_users": _spearman(store.item_num["item_clicks_before"][keys], p_all)}


def served_ctr(world, store, rankers: dict, n_users: int, k: int, seed: int) -> dict[str, dict[str, float]]:
    """True CTR of each ranker's top k over the catalogue, per user at one A/B-time request
    (mean over positions 0..k-1), paired with popularity's top k and the world's own top k."""
    from abtest.traffic import schedule
    from serving.funnel import Ranker

    keys = np.arange(1, len(store.item_id))
    keys = keys[np.array([x is not None for x in store.item_id[keys]])]
    ids = np.array([int(x) for x in store.item_ids(keys)])
    pop = np.array([int(x) for x in store.item_ids(store.popular[:k])])
    users = world.users_table()
    users = users[users["registered_ts"] < world.log_end_ts]["user_id"].to_numpy()
    rng = np.random.default_rng(seed)
    pos = np.arange(k)
    rank = {n: Ranker(m, store) for n, m in rankers.items()}
    per: dict[str, list[float]] = {n: [] for n in ["popularity", *rank, "oracle (world's top k)"]}
    for u in tqdm(rng.choice(users, min(n_users, len(users)), replace=False), desc="users", unit="user",
                  disable=not sys.stderr.isatty()):
        uk = int(store.user_keys([str(u)])[0])
        ts = int(schedule(world, 1, rng)[0])
        hist = store.user_history(uk)

        def ctr(items: np.ndarray, ts: int = ts, u: int = int(u)) -> float:
            return float(world.click_probabilities(np.full(len(items), u), items, pos[: len(items)],
                                                   np.full(len(items), ts)).mean())

        per["popularity"].append(ctr(pop))
        for n, r in rank.items():
            per[n].append(ctr(np.array([int(x) for x in store.item_ids(r.rank(uk, hist, keys, k, ts).keys)])))
        p_all = world.click_probabilities(np.full(len(ids), u), ids, np.zeros(len(ids)), np.full(len(ids), ts))
        per["oracle (world's top k)"].append(ctr(ids[np.argsort(-p_all)[:k]]))
    base = np.array(per["popularity"])
    out = {}
    for n, v in per.items():
        d = np.array(v) - base
        se = d.std(ddof=1) / np.sqrt(len(d)) / base.mean()
        lift = d.mean() / base.mean()
        out[n] = {"true_ctr": float(np.mean(v)), "lift": float(lift), "lift_ci95": [float(lift - 1.96 * se),
                                                                                     float(lift + 1.96 * se)]}
    return out


def main(argv: list[str] | None = None) -> int:
    from benchmarks.fidelity import Budget, _batches, _split, fit_rank
    from jobs.common import config_parser, load
    from pipeline.world import get_world
    from serving.features import FeatureStore
    from training.batches import RankingBatcher

    p = config_parser(__doc__)
    p.add_argument("--model", default=None, help="the ranker to fit (default: serve.ranker)")
    p.add_argument("--variants", default="all,no_item_ctr,no_item_counters")
    p.add_argument("--users", type=int, default=200)
    p.add_argument("--train-rows", type=int, default=0, help="0 = the whole train split")
    p.add_argument("--eval-rows", type=int, default=40_000)
    p.add_argument("--epochs", type=int, default=None, help="default: train.epochs")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/out/served_inputs.json")
    a = p.parse_args(argv)
    cfg = load(a)
    torch.set_num_threads(2)
    root, world = Path(cfg.data.output), get_world(cfg.world)
    name = a.model or cfg.serve.ranker
    store = FeatureStore(root)
    t0 = time.time()
    conf = confounding(world, store, root, 300, a.seed)
    print("### The logged item CTR as a serving input\n")
    for kk, v in conf.items():
        print(f"- {kk.replace('_', ' ')}: {v:.3f}" if isinstance(v, float) else f"- {kk}: {v}")
    b = Budget(train_rows=a.train_rows, eval_rows=a.eval_rows, epochs=a.epochs or cfg.train.epochs,
               seq_len=cfg.train.seq_len)
    batcher = RankingBatcher.from_dir(root, seq_len=b.seq_len)
    df = {s: _split(root, "ranking", s, b.train_rows if s == "train" else b.eval_rows, a.seed)
          for s in ("train", "val", "test")}
    data = {s: _batches(batcher, d, b.batch_size, s) for s, d in df.items()}  # every column, for every variant
    models, offline = {}, {}
    for v in a.variants.split(","):
        if v not in VARIANTS:
            raise SystemExit(f"--variants: unknown {v!r}; known: {', '.join(VARIANTS)}")
        drop = VARIANTS[v]
        spec = batcher.spec.subset(lambda f, drop=drop: f not in drop)  # the model reads only these
        model, res = fit_rank(name, {}, spec, data, b, a.seed, a.lr, cfg.model)
        models[v], offline[v] = model.eval(), {kk: res[kk] for kk in ("auc", "gauc", "val_auc", "epochs")
                                                if kk in res}
        print(f"fitted {name} [{v}]: test AUC {res['auc']:.4f}  [{time.time() - t0:.0f} s]", flush=True)
    served = served_ctr(world, store, models, a.users, cfg.abtest.slate_size, cfg.abtest.seed)
    print(f"\n### {name} by input variant: offline AUC vs the world's CTR of its top {cfg.abtest.slate_size} "
          f"over the catalogue ({a.users} users)\n")
    print("| ranker | test AUC | GAUC | true CTR of top k | lift vs popularity (95% CI) |")
    print("|---|---:|---:|---:|---:|")
    for n, s in served.items():
        o = offline.get(n, {})
        auc = f"{o['auc']:.4f}" if o else "–"
        gauc = f"{o['gauc']:.4f}" if o.get("gauc") is not None else "–"
        print(f"| {n} | {auc} | {gauc} | {s['true_ctr']:.4f} | {s['lift']:+.1%} "
              f"({s['lift_ci95'][0]:+.1%} … {s['lift_ci95'][1]:+.1%}) |")
    print(f"\n[{time.time() - t0:.0f} s]")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"config": a.config, "model": name, "confounding": conf, "offline": offline,
                                       "served": served, "users": a.users}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
