"""Does a model use its numeric inputs? Permutation importance on the test split.

  python -m benchmarks.input_shuffle --data data/processed/movielens --model mean_pool

Trains `--model` with the fidelity protocol (whole train split, early stopping on val AUC)
twice — once with the numeric inputs as the models now read them (log1p counts, log-odds
rates, standardised with the train split's statistics) and once with the old raw path
(no standardisation, rates as they are) — then shuffles one input column at a time across
the test rows and reports how much test AUC drops. A model that ignores an input loses
nothing when it is shuffled. Prints a markdown table and writes JSON (`--out`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from benchmarks.fidelity import STATE, Budget, _batches, _split, fit_rank
from training.batches import RankingBatcher
from training.step import predict_ranking, ranking_metrics


def raw_inputs(spec):
    """The spec as the models read it before standardisation: no statistics, rates untransformed."""
    out = spec.subset(lambda _: True)
    out.numeric = {k: ("none" if t == "logit" else t) for k, t in out.numeric.items()}
    out.numeric_stats = {}
    return out


def shuffle_drops(model, batcher, test, columns: list[str], b: Budget, seed: int) -> dict[str, float]:
    """Test AUC minus the test AUC with `column` permuted across rows, per column."""
    def auc(df):
        return ranking_metrics(predict_ranking(model, _batches(batcher, df, b.batch_size, "test"), keep=STATE))["auc"]

    base = auc(test)
    rng = np.random.default_rng(seed)
    out = {}
    for c in columns:
        shuffled = test.copy()
        shuffled[c] = rng.permutation(shuffled[c].to_numpy())
        out[c] = base - auc(shuffled)
    return {"auc": base, **{f"drop_{c}": v for c, v in out.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--model", default="mean_pool")
    p.add_argument("--columns", default="item_ctr,user_ctr,item_clicks_before,user_clicks_before")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/out/input_shuffle.json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    root, b = Path(a.data), Budget()
    batcher = RankingBatcher.from_dir(root, seq_len=b.seq_len)
    df = {s: _split(root, "ranking", s, 0, 0) for s in ("train", "val", "test")}
    columns = a.columns.split(",")
    rows = {}
    for label, spec in (("standardised (now)", batcher.spec), ("raw numeric inputs (before)", raw_inputs(batcher.spec))):
        bt = RankingBatcher(spec, batcher.history, b.seq_len)
        data = {s: _batches(bt, d, b.batch_size, s) for s, d in df.items()}
        model, _ = fit_rank(a.model, {}, spec, data, b, a.seed, a.lr)
        rows[label] = shuffle_drops(model, bt, df["test"], columns, b, a.seed)
    print(f"### Input shuffle: {a.model} on {root.name}, seed {a.seed}, lr {a.lr}\n")
    print("| inputs | test AUC | " + " | ".join(f"AUC drop, {c} shuffled" for c in columns) + " |")
    print("|---|---:|" + "---:|" * len(columns))
    for label, r in rows.items():
        print(f"| {label} | {r['auc']:.4f} | " + " | ".join(f"{r[f'drop_{c}']:+.4f}" for c in columns) + " |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"data": str(root), "model": a.model, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
