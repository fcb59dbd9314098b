"""Fidelity report: do the papers' claims hold on this data?

  python -m benchmarks.fidelity --data data/processed/small --data data/processed/movielens --seeds 3

Every claim of DESIGN.md's model sections, tested the same way, with a converged protocol:
every model trains on the whole train split (or a stated subsample, `--train-rows`) until
its validation AUC stops improving (`--patience` epochs without a new best, at most
`--max-epochs`), after a small learning-rate sweep per model family (`--lrs`, on seed 0,
chosen on val; the family's ablations reuse its rate); the floors are fitted to convergence
as before. Every row reports the optimiser steps its fits took. Several seeds, mean ± std.
Per dataset:

- Ranking: two honest floors on the same past-only features (no-training click-rate
  heuristic; logistic regression and gradient-boosted trees), the baselines (mean-pool,
  DIN on the short and the long sequence, DCNv2, SIM hard search), CDNet and its ablations
  (full sequence, w/o core behaviors, w/o distribution), DLF and its ablations (w/o gate,
  w/o RLI, w/o NAF), AdaF2M2 on DCNv2 and DLF with AUC per user/item state group, LREA at
  several λ with its train/serve gap, and DCNv2 with KARMA's similarity as one more input.
- Retrieval: a popularity list, the two-tower (plain and with AdaF2M2 towers), KARMA
  action-only (λ_dec = 0) and KARMA (λ_dec > 0): full-catalogue HR/NDCG/JS@K, overall and
  for cold-start targets (IDs never seen in training).
- Claims: each as a paired difference over seeds; "holds" when the mean difference is
  positive and at least two standard errors, "not significant" when positive but smaller,
  "does not hold" otherwise.

Plain PyTorch on CPU (the same step and metrics as the Ray Train loop); one process per
dataset can run side by side. Prints markdown and writes JSON (`--out`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from benchmarks.fidelity_common import Budget, _batches, _fmt, _shuffled, _split, mean_std
from benchmarks.fidelity_retrieval import KARMA_SIM_ROW, RETRIEVAL, retrieval_table, run_retrieval
from configs import ModelConfig, load_config
from models import build_model
from models.lrea import serving_gap
from training.batches import RankingBatcher, RetrievalBatcher
from training.fit import fit_early_stopping
from training.floors import evaluate_floors
from training.retrieval import Catalogue
from training.step import make_optimizer, predict_ranking, ranking_metrics

STATE = ("user_clicks_before", "item_clicks_before")


# (row label, model name, params); D and the budget are the same for all. The first row of
# each model name is the one its learning rate is swept on; the name's other rows reuse it.
RANKING: list[tuple[str, str, dict[str, Any]]] = [
    ("mean_pool", "mean_pool", {}),
    ("din (short seq)", "din", {"sequence": "short"}),
    ("din (short seq, no softmax)", "din", {"sequence": "short", "attention_norm": "none"}),
    ("din (long seq)", "din", {"sequence": "long"}),
    ("dcnv2", "dcnv2", {}),
    ("sim_hard", "sim_hard", {}),
    ("cdnet", "cdnet", {}),
    ("cdnet: full sequence", "cdnet", {"full_sequence": True}),
    ("cdnet: w/o core", "cdnet", {"use_core": False}),
    ("cdnet: w/o distribution", "cdnet", {"use_distribution": False}),
    ("dlf", "dlf", {}),
    ("dlf: w/o gate", "dlf", {"use_gate": False}),
    ("dlf: w/o RLI", "dlf", {"use_rli": False}),
    ("dlf: w/o NAF", "dlf", {"use_naf": False}),
    ("dlf + LayerNorm after eq. 9", "dlf", {"post_norm": True}),
    ("adaf2m2:dcnv2", "adaf2m2:dcnv2", {}),
    ("adaf2m2:dlf", "adaf2m2:dlf", {}),
    ("lrea λ=0", "lrea", {"lam": 0.0}),
    ("lrea λ=0.03", "lrea", {"lam": 0.03}),
    ("lrea λ=0.3", "lrea", {"lam": 0.3}),
    ("lrea λ=1", "lrea", {"lam": 1.0}),
]
# `--rows paper`: each paper model and the baselines the acceptance compares it with;
# `--rows core`: those plus the cheap ablations (the expensive ones —
# CDNet over the full sequence, AdaF2M2 around DLF, two DLF ablations, two λ — run with `all`)
PAPER = {"mean_pool", "din (short seq)", "dcnv2", "sim_hard", "cdnet", "dlf", "adaf2m2:dcnv2", "lrea λ=0.3"}
CORE = {"mean_pool", "din (short seq)", "din (short seq, no softmax)", "din (long seq)", "dcnv2", "sim_hard",
        "cdnet", "cdnet: w/o core", "cdnet: w/o distribution", "dlf", "dlf: w/o NAF", "dlf + LayerNorm after eq. 9",
        "adaf2m2:dcnv2",
        "lrea λ=0", "lrea λ=0.3"}
# (claim, better row, worse row, metric)
CLAIMS: list[tuple[str, str, str, str]] = [
    ("CDNet > mean-pool", "cdnet", "mean_pool", "auc"),
    ("CDNet > DIN (short)", "cdnet", "din (short seq)", "auc"),
    ("CDNet ≥ its full-sequence variant", "cdnet", "cdnet: full sequence", "auc"),
    ("CDNet core behaviors help", "cdnet", "cdnet: w/o core", "auc"),
    ("CDNet distribution token helps", "cdnet", "cdnet: w/o distribution", "auc"),
    ("DLF > DCNv2", "dlf", "dcnv2", "auc"),
    ("DLF gate helps", "dlf", "dlf: w/o gate", "auc"),
    ("DLF RLI helps", "dlf", "dlf: w/o RLI", "auc"),
    ("DLF NAF helps", "dlf", "dlf: w/o NAF", "auc"),
    ("AdaF2M2 lifts DCNv2", "adaf2m2:dcnv2", "dcnv2", "auc"),
    ("AdaF2M2 lifts DCNv2 for new users", "adaf2m2:dcnv2", "dcnv2", "auc_new_users"),
    ("AdaF2M2 lifts DCNv2 for cold items", "adaf2m2:dcnv2", "dcnv2", "auc_cold_items"),
    ("AdaF2M2 lifts DLF", "adaf2m2:dlf", "dlf", "auc"),
    ("AdaF2M2 lifts DLF for new users", "adaf2m2:dlf", "dlf", "auc_new_users"),
    ("AdaF2M2 lifts DLF for cold items", "adaf2m2:dlf", "dlf", "auc_cold_items"),
    ("AdaF2M2 lifts the two-tower (HR@K)", "adaf2m2:two_tower", "two_tower", "hr"),
    ("LREA ≥ DIN over the long sequence", "lrea λ=0.3", "din (long seq)", "auc"),
    ("LREA > DIN on the short sequence", "lrea λ=0.3", "din (short seq)", "auc"),
    ("LREA > SIM hard search", "lrea λ=0.3", "sim_hard", "auc"),
    ("KARMA decodability lifts HR@K", "karma (λ_dec=0.5)", "karma action-only (λ_dec=0)", "hr"),
    ("KARMA decodability lifts cold-start HR@K", "karma (λ_dec=0.5)", "karma action-only (λ_dec=0)", "hr_cold"),
    ("KARMA decodability keeps JS@K", "karma (λ_dec=0.5)", "karma action-only (λ_dec=0)", "js"),
    ("log-q + uniform negatives lift KARMA's HR@K", "karma (λ_dec=0.5)",
     "karma (λ_dec=0.5) w/o log-q and uniform negatives", "hr"),
    ("KARMA > popularity on cold-start HR@K", "karma (λ_dec=0.5)", "popularity", "hr_cold"),
    ("KARMA > popularity on cold-start recall at the served size", "karma (λ_dec=0.5)", "popularity",
     "merged_served_cold"),
    ("decodability lifts cold-start recall at the served size", "karma (λ_dec=0.5)", "karma action-only (λ_dec=0)",
     "merged_served_cold"),
    ("item bias lifts KARMA's HR@K (variant)", "variant: karma + item bias", "karma (λ_dec=0.5)", "hr"),
    ("KARMA ≥ the two-tower (HR@K)", "karma (λ_dec=0.5)", "two_tower", "hr"),
    ("merged recall (KARMA ∪ popularity) > popularity at the served size", "karma (λ_dec=0.5)", "popularity",
     "merged_served"),
    ("merged recall (two-tower ∪ popularity) > popularity at the served size", "two_tower", "popularity",
     "merged_served"),
    ("merged recall (two-tower w/o item counters ∪ popularity) > popularity at the served size",
     "two_tower (no item counters)", "popularity", "merged_served"),
    ("KARMA ≥ the two-tower w/o item counters (HR@K)", "karma (λ_dec=0.5)", "two_tower (no item counters)", "hr"),
    ("two-tower: w/o item counters > with them (HR@K)", "two_tower (no item counters)", "two_tower", "hr"),
    ("KARMA similarity lifts ranking AUC", KARMA_SIM_ROW, "dcnv2", "auc"),
    ("best paper model > best floor", "_best_model", "_best_floor", "auc"),
]


# --------------------------------------------------------------------------- fits


def fit_rank(name: str, params: dict, spec, data: dict[str, list], b: Budget, seed: int,
             lr: float, models: ModelConfig | None = None) -> tuple[torch.nn.Module, dict]:
    """Train until val AUC stops improving (patience, at most b.epochs); the best epoch's weights
    are tested. The model's params are its config section (`models`, the config's `model:`
    sections, as every job builds it) with the row's `params` on top. Returns the model and test
    metrics + val AUC, lr, epochs, steps, seconds, curve."""
    torch.manual_seed(seed)
    model = build_model(name, spec, (models or ModelConfig()).params_for(name, params)).to(b.device)
    opt = make_optimizer(model.parameters(), lr=lr)
    amp = torch.bfloat16 if b.device == "cuda" else None
    evaluate = lambda split: ranking_metrics(predict_ranking(model, data[split], b.device, amp, keep=STATE),  # noqa: E731
                                             **b.thresholds)
    t0 = time.perf_counter()
    best_epoch, history = fit_early_stopping(model, _shuffled(data["train"], seed), lambda: evaluate("val"), "auc",
                                             opt, epochs=b.epochs, patience=b.patience, device=b.device, amp_dtype=amp)
    out = evaluate("test") | {
        "val_auc": max(h["val_auc"] for h in history), "lr": lr, "epochs": len(history), "best_epoch": best_epoch,
        "steps": len(data["train"]) * len(history), "seconds": time.perf_counter() - t0,
        "curve": [round(h["val_auc"], 5) for h in history]}
    return model, out




def run_dataset(root: Path, seeds: list[int], b: Budget, only: set[str] | None = None,
                parts: tuple[str, ...] = ("ranking", "retrieval"), on_seed=None,
                models: ModelConfig | None = None) -> dict[str, Any]:
    """Every row on every seed; `on_seed(partial result)` after each seed (the JSON is written as it goes)."""
    results: dict[str, list[dict]] = {}
    lrs: dict[str, float] = {}  # family -> the learning rate its sweep chose
    n_rows = {s: len(pd.read_parquet(root / "ranking" / f"split={s}", columns=["label"])) for s in ("train", "val", "test")}
    result = lambda done: {"dataset": root.name, "seeds": done, "budget": vars(b) | {"lrs": list(b.lrs)},  # noqa: E731
                           "results": results, "rows": n_rows, "lrs": dict(lrs)}
    add = lambda row, m: results.setdefault(row, []).append(m)  # noqa: E731
    want = lambda row: only is None or row in only  # noqa: E731
    cat = Catalogue.from_dir(root)
    rank_b = RankingBatcher.from_dir(root, seq_len=b.seq_len)
    retr_b = RetrievalBatcher.from_dir(root, seq_len=b.karma_len, logq=cat.logq)
    for seed in seeds:
        print(f"[fidelity] {root.name} seed {seed}", flush=True)
        karma = run_retrieval(root, cat, retr_b, b, seed, want, add, models) if "retrieval" in parts else None
        if "ranking" not in parts:
            if on_seed is not None:
                on_seed(result(seeds[: seeds.index(seed) + 1]))
            continue
        # ---- ranking
        # the train sample follows the seed; val / test samples are the same rows for every seed
        df = {s: _split(root, "ranking", s, b.train_rows if s == "train" else b.eval_rows, seed if s == "train" else 0)
              for s in ("train", "val", "test")}
        for k, v in evaluate_floors(df["train"], df["test"], rank_b.spec, seed=seed).items():
            add(f"floor: {k}", v)
        data = {s: _batches(rank_b, d, b.batch_size, f"ranking {s}") for s, d in df.items()}
        for row, name, params in RANKING:
            if not want(row):
                continue
            fam = name  # the learning-rate family: a model and its ablations share the rate
            if seed == seeds[0] and fam not in lrs:  # the family's sweep: every lr on the first seed, best val
                fits = [fit_rank(name, params, rank_b.spec, data, b, seed, lr, models) for lr in b.lrs]
                model, m = max(fits, key=lambda f: f[1]["val_auc"])
                lrs[fam] = m["lr"]
                m["sweep"] = {f[1]["lr"]: round(f[1]["val_auc"], 5) for f in fits}
            else:
                model, m = fit_rank(name, params, rank_b.spec, data, b, seed, lrs.get(fam, b.lr), models)
            if name == "lrea":
                with torch.no_grad():
                    m |= serving_gap(model, data["test"][0])
            add(row, m)
            print(f"  {row:<30} auc {m['auc']:.4f}  val {m['val_auc']:.4f}  lr {m['lr']:g}  epochs {m['epochs']} "
                  f"steps {m['steps']}  ({m['seconds']:.0f}s)  {m.get('sweep', '')}", flush=True)
        if karma is not None and want(KARMA_SIM_ROW):
            kb = RankingBatcher(rank_b.spec, rank_b.history, b.seq_len, karma=karma, karma_len=b.karma_len)
            kdata = {s: _batches(kb, d, b.batch_size, f"karma_sim {s}") for s, d in df.items()}
            add(KARMA_SIM_ROW, fit_rank("dcnv2", {}, rank_b.spec.with_numeric("karma_sim"), kdata, b, seed,
                                        lrs.get("dcnv2", b.lr), models)[1])
        if on_seed is not None:
            on_seed(result(seeds[: seeds.index(seed) + 1]))
    return result(seeds)


# --------------------------------------------------------------------------- report


def ranking_table(res: dict[str, list[dict]]) -> str:
    cols = ["auc", "gauc", "logloss", "auc_new_users", "auc_cold_items"]
    extra = ["lr", "epochs", "steps", "s/fit"]
    lines = ["| model | " + " | ".join(cols + extra) + " |", "|---|" + "---:|" * (len(cols) + len(extra))]
    for row, ms in res.items():
        if "hr" in ms[0]:
            continue
        cells = [_fmt([m.get(c) for m in ms]) for c in cols]
        for key, f in (("lr", "{:g}"), ("epochs", "{:.1f}"), ("steps", "{:,.0f}"), ("seconds", "{:.0f}")):
            v = mean_std([m.get(key) for m in ms])[0]
            cells.append("–" if v != v else f.format(v))
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def lrea_table(res: dict[str, list[dict]]) -> str:
    lines = ["| λ | test AUC | interest rel. gap (train vs absorbed) | mean abs logit gap |", "|---|---:|---:|---:|"]
    for row, ms in res.items():
        if row.startswith("lrea"):
            lines.append(f"| {row.split('=')[1]} | {_fmt([m['auc'] for m in ms])} | "
                         f"{_fmt([m['interest_rel_gap'] for m in ms])} | {_fmt([m['logit_abs_gap'] for m in ms])} |")
    return "\n".join(lines)


def claims_table(res: dict[str, list[dict]]) -> str:
    res = dict(res)
    paper = [r for r, *_ in RANKING if not any(x in r for x in (":", "w/o", "full"))
             and r.split()[0] in ("cdnet", "dlf", "lrea")] + ["adaf2m2:dcnv2", "adaf2m2:dlf"]
    floors = [r for r in res if r.startswith("floor:")]
    best = lambda rows: max((r for r in rows if r in res), key=lambda r: mean_std([m["auc"] for m in res[r]])[0])  # noqa: E731
    if floors and any(r in res for r in paper):
        res["_best_model"], res["_best_floor"] = res[best(paper)], res[best(floors)]
    lines = ["| claim | Δ (mean ± std over seeds) | verdict |", "|---|---:|---|"]
    for text, a, bb, metric in CLAIMS:
        if a not in res or bb not in res:
            continue
        d = np.array([x.get(metric, np.nan) - y.get(metric, np.nan) for x, y in zip(res[a], res[bb], strict=False)])
        d = d[~np.isnan(d)]
        if not len(d):
            continue
        m, s = float(d.mean()), float(d.std(ddof=1)) if len(d) > 1 else 0.0
        se = s / math.sqrt(len(d)) if len(d) > 1 else float("inf")
        verdict = "holds" if m > 0 and m >= 2 * se else ("not significant" if m > 0 else "does not hold")
        if text.startswith("best paper"):
            text += f" ({best(paper)} vs {best(floors)})"
        lines.append(f"| {text} | {m:+.4f} ± {s:.4f} | {verdict} |")
    return "\n".join(lines)


def report(out: dict[str, Any]) -> str:
    b = out["budget"]
    rows = out["rows"]
    n_train = f"{b['train_rows']:,} train rows (of {rows['train']:,})" if b["train_rows"] else f"all {rows['train']:,} train rows"
    n_eval = f"{b['eval_rows']:,} val / test rows (the same rows for every seed)" if b["eval_rows"] else (
        f"all {rows['val']:,} val / {rows['test']:,} test rows")
    head = (f"### {out['dataset']} — seeds {out['seeds']}\n\nBudget per model: {n_train}, {n_eval}; up to "
            f"{b['epochs']} epochs, early stopping on val AUC with patience {b.get('patience', b['epochs'])} (the best "
            f"epoch is tested); Adam, learning rate swept per model family over {list(b.get('lrs', [b['lr']]))} on seed "
            f"{out['seeds'][0]} and chosen on val; batch {b['batch_size']}, D = {b['embed_dim']}, history "
            f"{b['seq_len']} (short 20).\n")
    ranking = any("auc" in ms[0] for ms in out["results"].values())
    if not ranking:  # the retrieval half alone: its own protocol line
        head = (f"### {out['dataset']} — seeds {out['seeds']} (retrieval)\n\nBudget per model: up to {b['epochs']} "
                f"epochs, early stopping on val HR@{b['k']} with patience {b['patience']} (the best epoch is tested); "
                f"Adam, learning rate {b['lr']:g}, batch {b['batch_size']}; each model's params from its config "
                f"section with the row's on top.\n")
    parts = [head]
    if ranking:
        parts += ["Ranking (test split; steps = optimiser steps per fit, mean over seeds):", ranking_table(out["results"]),
                  "LREA: train/serve gap against λ (test rows):", lrea_table(out["results"])]
    if any(r in out["results"] for r in RETRIEVAL):
        parts += [f"Retrieval (test split, the items released at each row's time; a sample of "
                  f"{b['retrieval_train_rows']:,} train clicks (it follows the seed), the same "
                  f"{b['retrieval_eval_rows']:,} val / test rows for every seed, K = {b['k']}, KARMA history "
                  f"{b['karma_len']}):",
                  retrieval_table(out["results"], b["k"], tuple(b.get("served", (500, 100))))]
    return "\n\n".join([*parts, "Claims:", claims_table(out["results"])])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", action="append", default=[], help="a processed data folder (repeatable)")
    p.add_argument("--config", help="a YAML config whose model: sections the models are built from (default: "
                                    "the models' own defaults, as in configs/small.yaml)")
    p.add_argument("--report", nargs="+", help="print the markdown of earlier --out JSON files, run nothing")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--train-rows", type=int, default=Budget.train_rows)
    p.add_argument("--eval-rows", type=int, default=Budget.eval_rows)
    p.add_argument("--epochs", type=int, default=Budget.epochs, help="the most epochs a fit may take")
    p.add_argument("--retrieval-train-rows", type=int, default=Budget.retrieval_train_rows)
    p.add_argument("--retrieval-eval-rows", type=int, default=Budget.retrieval_eval_rows)
    p.add_argument("--patience", type=int, default=Budget.patience, help="epochs without a new best val AUC")
    p.add_argument("--lrs", default=",".join(map(str, Budget.lrs)), help="the per-family learning-rate sweep")
    p.add_argument("--batch-size", type=int, default=Budget.batch_size)
    p.add_argument("--rows", choices=("paper", "core", "all"), default="all",
                   help="paper: the paper models and their baselines; core: those and the cheap ablations")
    p.add_argument("--parts", default="ranking,retrieval", help="ranking, retrieval or both")
    p.add_argument("--only", help="comma-separated row labels (debugging)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (one per process side by side)")
    p.add_argument("--device", default="auto", help="auto (cuda where present), cuda or cpu")
    p.add_argument("--out", default="benchmarks/out/fidelity.json")
    a = p.parse_args(argv)
    if a.report:
        for f in a.report:
            for out in json.loads(Path(f).read_text()):
                print(report(out), "\n", flush=True)
        return 0
    if not a.data:
        p.error("--data is required (or --report)")
    torch.set_num_threads(a.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    b = Budget(train_rows=a.train_rows, eval_rows=a.eval_rows, epochs=a.epochs, patience=a.patience,
               retrieval_train_rows=a.retrieval_train_rows, retrieval_eval_rows=a.retrieval_eval_rows,
               batch_size=a.batch_size, lrs=tuple(float(x) for x in a.lrs.split(",")), device=device)
    subset = {"paper": PAPER, "core": CORE, "all": None}[a.rows]
    only = set(a.only.split(",")) if a.only else (None if subset is None else subset | set(RETRIEVAL) | {KARMA_SIM_ROW})
    if a.only and (unknown := only - {r for r, *_ in RANKING} - set(RETRIEVAL) - {KARMA_SIM_ROW}):
        p.error(f"--only: no row named {sorted(unknown)} (labels are comma-separated; rows: "
                f"{[r for r, *_ in RANKING] + RETRIEVAL + [KARMA_SIM_ROW]})")
    parts = tuple(x.strip() for x in a.parts.split(","))
    if unknown := set(parts) - {"ranking", "retrieval"}:
        p.error(f"--parts: unknown {sorted(unknown)}; use ranking, retrieval")
    outs: list[dict] = []
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    save = lambda extra=(): Path(a.out).write_text(json.dumps([*outs, *extra], indent=1, default=float))  # noqa: E731
    t0 = time.perf_counter()
    for d in a.data:
        root = Path(d)
        if not (root / "feature_spec.json").exists():
            p.error(f"{root}: no processed data (run `python -m jobs.ingest` first)")
        out = run_dataset(root, list(range(a.seeds)), b, only, parts, on_seed=lambda partial: save([partial]),
                          models=load_config(a.config).model if a.config else None)
        outs.append(out)
        save()
        print(report(out), flush=True)
    print(f"[fidelity] wall time {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
