"""The retrieval half of the fidelity report (benchmarks/fidelity.py): popularity, the two-towers
and KARMA (the paper's form, its ablations and the labelled variants), each trained until val
HR@K stops improving and tested the way a recall channel is used (training/retrieval.py: the
items released at each row's time; popularity alone; the merged recall at the served sizes;
cold-start HR; collapse diagnostics)."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from benchmarks.fidelity_common import Budget, _batches, _fmt, _shuffled, _split, mean_std
from configs import ModelConfig
from models import build_model
from models.karma import KARMAConfig
from training.batches import RetrievalBatcher
from training.fit import fit_early_stopping
from training.retrieval import Catalogue, evaluate_retrieval, popularity_topk, retrieval_metrics
from training.step import make_optimizer

KARMA_SIM_ROW = "dcnv2 + karma_sim"
# (row label, model name, params over its config section); "popularity" is computed, not fitted
RETRIEVAL_ROWS: list[tuple[str, str, dict[str, Any]]] = [
    ("two_tower", "two_tower", {}),
    ("two_tower (no item counters)", "two_tower", {"item_counters": False}),
    ("adaf2m2:two_tower", "adaf2m2:two_tower", {}),
    ("karma action-only (λ_dec=0)", "karma", {"lam_dec": 0.0}),
    ("karma (λ_dec=0.5)", "karma", {"lam_dec": 0.5}),
    ("karma (λ_dec=0.5) w/o log-q and uniform negatives", "karma", {"lam_dec": 0.5, "logq": False, "uniform_negatives": 0}),
    ("variant: karma + item bias", "karma", {"lam_dec": 0.5, "item_bias": True}),
    ("variant: karma + ID embedding", "karma", {"lam_dec": 0.5, "id_embedding": True}),
    ("karma (λ_dec=0.5) over frozen MiniLM title vectors", "karma", {"lam_dec": 0.5, "text_encoder": "features"}),
]
RETRIEVAL = ["popularity"] + [r for r, *_ in RETRIEVAL_ROWS]
KARMA_BEST = "karma (λ_dec=0.5)"  # the paper's form, the one the KARMA-similarity ranking row reads


def fit_retr(model: torch.nn.Module, data: dict[str, list], cat: Catalogue, b: Budget, seed: int) -> dict:
    """Train until val HR@K stops improving (patience, at most b.epochs; the best epoch's weights
    are tested), then the test split at the served sizes (merged recall, popularity alone)."""
    opt = make_optimizer(model.parameters(), lr=b.lr)
    t0 = time.perf_counter()
    best_epoch, history = fit_early_stopping(
        model, _shuffled(data["train"], seed), lambda: evaluate_retrieval(model, data["val"], cat, b.k), f"hr_{b.k}",
        opt, epochs=b.epochs, patience=b.patience)
    out = evaluate_retrieval(model, data["test"], cat, b.k, served=b.served)
    return _retr_keys(out, b) | {"seconds": time.perf_counter() - t0, "epochs": len(history), "best_epoch": best_epoch,
                                 "steps": len(data["train"]) * len(history),
                                 "curve": [round(h[f"val_hr_{b.k}"], 4) for h in history]}


def _retr_keys(m: dict[str, float], b: Budget) -> dict[str, float]:
    """hr_50 → hr, merged_hr_500+100 → merged_served etc., so claims and tables do not depend on K."""
    r, p = b.served
    out = dict(m)
    for old, new in ((f"merged_hr_{r}+{p}", "merged_served"), (f"pop_hr_{r + p}", "pop_served"),
                     (f"retr_hr_{r}", "retr_served"), (f"pop_hr_{p}", "pop_channel")):
        for suffix in ("", "_cold"):
            if old + suffix in out:
                out[new + suffix] = out.pop(old + suffix)
    return {re.sub(f"_{b.k}(?=$|_cold$)", "", key): v for key, v in out.items()}


def popularity(test: pd.DataFrame, cat: Catalogue, b: Budget) -> dict[str, float]:
    """Popularity alone: the most-clicked train items released at each row's ts, at K and at the
    served merged size (its "merged" value is itself at that size)."""
    r, p = b.served
    ts, target = test["ts"].to_numpy(), test["item_key"].to_numpy()
    top = popularity_topk(cat, ts, r + p)
    out = _retr_keys(retrieval_metrics(top, target, cat, b.k), b)
    hit = (top == target[:, None]).any(1)
    out |= {"merged_served": float(hit.mean()), "pop_served": float(hit.mean()),
            "pop_channel": float((top[:, :p] == target[:, None]).any(1).mean())}
    cold = cat.oov[target]
    if cold.any():
        out["merged_served_cold"] = float(hit[cold].mean())
    return out


def run_retrieval(root: Path, cat: Catalogue, retr_b: RetrievalBatcher, b: Budget, seed: int, want, add,
                  models: ModelConfig | None = None):
    """Popularity, the two-towers and the KARMA rows (RETRIEVAL_ROWS, each built from its config
    section with the row's params on top) on one seed's sample of the retrieval rows; returns
    the trained KARMA_BEST (for the KARMA-similarity ranking row) or None."""
    from training.tasks import karma_for

    rdf = {s: _split(root, "retrieval", s, b.retrieval_train_rows if s == "train" else b.retrieval_eval_rows,
                     seed if s == "train" else 0) for s in ("train", "val", "test")}
    rdata = {s: _batches(retr_b, d, b.batch_size, f"retrieval {s}") for s, d in rdf.items()}
    add("popularity", popularity(rdf["test"], cat, b))
    models = models or ModelConfig()
    karma = None
    for row, name, params in RETRIEVAL_ROWS:
        if not (want(row) or (row == KARMA_BEST and want(KARMA_SIM_ROW))):
            continue
        torch.manual_seed(seed)
        full = models.params_for(name, params)
        if name == "karma":
            from models import make_config

            m = karma_for(make_config(KARMAConfig, full, f"fidelity row {row!r}"), cat, b.karma_len)
        else:
            m = build_model(name, retr_b.spec, full)
        res = fit_retr(m, rdata, cat, b, seed)
        add(row, res)
        print(f"  {row:<48} hr@{b.k} {res['hr']:.4f}  cold {res.get('hr_cold', float('nan')):.4f}  merged "
              f"{res['merged_served']:.4f}  cos {res.get('user_cos', float('nan')):.3f}  epochs {res['epochs']}  "
              f"({res['seconds']:.0f}s)", flush=True)
        karma = m if row == KARMA_BEST else karma
    return karma


def retrieval_table(res: dict[str, list[dict]], k: int, served: tuple[int, int]) -> str:
    r, p = served
    cols = [("hr", f"HR@{k}"), ("ndcg", f"NDCG@{k}"), ("js", f"JS@{k}"), ("hr_cold", f"HR@{k} cold"),
            ("merged_served", f"merged HR ({r} ∪ {p} popular)"), ("merged_served_cold", "merged HR cold"),
            ("user_cos", "user cos"), ("user_eff_rank", "eff. rank")]
    lines = ["| model | " + " | ".join(c for _, c in cols) + " | epochs | s/fit |", "|---|" + "---:|" * (len(cols) + 2)]
    for row in RETRIEVAL:
        if row in res:
            ep, sec = mean_std([m.get("epochs") for m in res[row]])[0], mean_std([m.get("seconds") for m in res[row]])[0]
            lines.append(f"| {row} | " + " | ".join(_fmt([m.get(c) for m in res[row]]) for c, _ in cols)
                         + f" | {'–' if ep != ep else f'{ep:.1f}'} | {'–' if sec != sec else f'{sec:.0f}'} |")
    return "\n".join(lines)
