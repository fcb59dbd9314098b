"""How much CTR can the funnel win? An offline replay of the A/B, scored by the world itself.

  python -m benchmarks.ab_headroom --config configs/small.yaml [--users 600] [--alias challenger]
                                   [--ranker-uri models:/funnel-cdnet/3] [--set serve.popular_n=300] [--catalogue]
                                   [--hold-numeric user|item] [--hold-ids item_idx]

The same simulated users and request times as `jobs.abtest` (sessions like the logs', the
clicks of each slate fed back into the next request's history), but in one process through
the serving classes themselves (serving/funnel.py: FAISS retrieval + popularity channel,
LREA pre-ranking, the ranker), no Ray Serve. Every user sees every slate below, so the
comparison is paired. Per slate the mean *true* click probability over positions 0..k-1
(the world's position bias included), not sampled clicks:

- popularity: the control arm (the log's most clicked items);
- funnel: retrieval → pre-ranking → ranking, exactly as served;
- where the funnel loses its headroom, stage by stage, for the same requests: the best k the
  world itself would pick among the retrieved candidates (the recall ceiling: what a perfect
  pre-ranker and ranker could serve), the same among the pre-ranked top m (what a perfect
  ranker could serve), and the ranker over all retrieved candidates (no pre-ranking cut);
- the pre-ranker's own top k, and the sum of the ranker's and the pre-ranker's logits over the
  pre-ranked (a two-model ensemble at the last stage); and that sum plus w × the retriever's score
  (w in RETRIEVAL_WEIGHTS: the three models' ensemble, what `serve.retrieval_weight` w serves
  with `serve.prerank_weight: 1` but for the pre-rank cut, which stays the served one); the retriever's
  own top k of the retrieved and of the pre-ranked;
- ranker over the catalogue (with --catalogue): the ranker's top k of every known item;
- oracle: the world's own top k for that user and time; and the same blind to the short-term
  interest term, and on the long-term affinity and item bias only (how much of the headroom each
  term of the click model holds).

It also regresses each stage's scores on the world's logit terms (long-term, short-term and dormant
affinity, item bias; centred within each request): what each stage has learned of the world.

The funnel's own clicks (sampled from the world) extend its history; the other slates read
the same history. Prints a table with the paired lift over popularity and its 95% CI, and
the minimum number of A/B users to detect that lift (two-sided α = 0.05, power 0.8) at the
configured requests per user; writes JSON. Use it to size the A/B before running it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm


def _stage_models(cfg, alias: str, ranker_uri: str | None):
    import mlflow

    from serving.funnel import Preranker, Ranker, Retriever
    from serving.index_build import index_for_version
    from training.registry import load_model, registered_name

    client = mlflow.MlflowClient()
    out = {}
    for kind, model in (("retriever", cfg.serve.retriever), ("preranker", cfg.serve.preranker),
                        ("ranker", cfg.serve.ranker)):
        mv = client.get_model_version_by_alias(registered_name(model), alias)
        uri = ranker_uri if kind == "ranker" and ranker_uri else f"models:/{registered_name(model)}/{mv.version}"
        out[kind] = (load_model(uri), mv)
    from serving.features import FeatureStore

    store = FeatureStore(cfg.data.output)
    retr, mv = out["retriever"]
    index = index_for_version(retr, mv.run_id, mv.version, cfg.data.output, cfg.serve.index_factory)
    return (store, Retriever(retr, index, store, cfg.serve.popular_n),
            Preranker(out["preranker"][0], store, cfg.serve.retrieval_weight, short_exact=cfg.serve.lrea_short_exact), Ranker(out["ranker"][0], store, cfg.serve.prerank_weight))


def hold_numeric(store, prefix: str) -> None:
    """Diagnosis: every numeric input named `<prefix>_*` (or named `prefix` itself, one field)
    reaches the pre-ranker and the ranker at the raw value whose transform is its train mean
    (z = 0), on this store instance only — how much of the served ranking rests on those inputs."""
    from models.spec import numeric_transform

    held = {}
    for f, (mean, _) in store.spec.numeric_stats.items():
        if f == prefix or f.startswith(prefix + "_"):
            kind = store.spec.numeric[f]
            held[f] = float(np.expm1(mean) if kind == "log1p" else 1 / (1 + np.exp(-mean)) if kind == "logit" else mean)
            assert abs(float(numeric_transform(np.array([held[f]]), kind)[0]) - mean) < 1e-4, f
    if not held:
        raise SystemExit(f"--hold-numeric {prefix}: no numeric input with train statistics starts with {prefix}_")
    build = store.ranking_batch

    def ranking_batch(*args, **kwargs):
        out = build(*args, **kwargs)
        for f, v in held.items():
            out[f] = torch.full_like(out[f], v)
        return out

    store.ranking_batch = ranking_batch


TERMS = ("long-term", "short-term", "dormant", "item bias")
RETRIEVAL_WEIGHTS = (5.0, 10.0, 20.0, 40.0, 80.0)  # on the retriever's score (its within-request sd is ~0.1 of the ranker logit's)


def three_model_row(w: float) -> str:
    return f"ranker + pre-ranker + {w:g} × retrieval score (sum) over the pre-ranked"


def world_terms(world, user: int, item_ids: np.ndarray, ts: int) -> np.ndarray:
    """(n, 4) the world's click logit of each item for this user at ts, term by term (pipeline/world.py):
    γ·⟨0.5·u_long, v_i⟩/√K, γ·⟨0.4·μ_short(t), v_i⟩/√K, γ·⟨0.3·1[dormant]·μ_dormant, v_i⟩/√K, b·β_i."""
    c = world.cfg
    u = world.user_rows(np.array([user]))
    t = np.array([ts], dtype=np.int64)
    v = world.item_vecs[world.item_rows(item_ids)] * (c.affinity_scale / np.sqrt(c.latent_dim))
    parts = (0.5 * world.user_long_vec[u[0]],
             0.4 * world.cat_centers[world.short_term_category(u, t)[0]],
             0.3 * float(world.dormant_active(t)[0]) * world.cat_centers[world.user_dormant[u[0]]])
    terms = np.column_stack([v @ x for x in parts] + [c.item_bias_scale * world.item_bias[world.item_rows(item_ids)]])
    n = len(item_ids)
    truth = world.click_logits_rows(np.repeat(u, n), world.item_rows(item_ids), np.zeros(n), np.full(n, ts))
    if not np.allclose(terms.sum(1) + c.base_logit, truth):  # the decomposition must be the world's own logit
        raise AssertionError("world_terms does not add up to World.click_logits_rows: the click model changed")
    return terms


def term_weights(rows: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """Least squares of a stage's score on the world's terms, both centred within each request:
    how much of each term the stage's ordering of the candidates carries (the world's own logit
    gives 1 on every term). Scores are logits; the fit also reports the within-request R²."""
    X = np.concatenate([t - t.mean(0) for t, _ in rows])
    y = np.concatenate([s - s.mean() for _, s in rows])
    keep = X.std(0) > 1e-9
    w = np.zeros(X.shape[1])
    w[keep] = np.linalg.lstsq(X[:, keep], y, rcond=None)[0]
    r2 = 1.0 - float(((y - X @ w) ** 2).sum() / max((y ** 2).sum(), 1e-12))
    return {**{n: float(x) for n, x in zip(TERMS, w, strict=True)}, "r2": r2}


def hold_ids(store, fields: list[str]) -> None:
    """Diagnosis: these categorical inputs (e.g. item_idx) reach the pre-ranker and the ranker as the
    OOV id 1 (the row id dropout trains), on this store instance only — how much of the served
    ranking rests on the learned id embeddings rather than on content and counters."""
    unknown = [f for f in fields if f not in store.spec.categorical]
    if unknown:
        raise SystemExit(f"--hold-ids {','.join(unknown)}: not a categorical input of this data "
                         f"(known: {', '.join(store.spec.categorical)})")
    build = store.ranking_batch

    def ranking_batch(*args, **kwargs):
        out = build(*args, **kwargs)
        for f in fields:
            out[f] = torch.ones_like(out[f])
            if f == "item_idx":
                out["hist_item_idx"] = torch.where(out["hist_item_idx"] > 0, 1, 0)
        return out

    store.ranking_batch = ranking_batch


def main(argv: list[str] | None = None) -> int:
    from jobs.common import config_parser, load

    p = config_parser(__doc__)
    p.add_argument("--users", type=int, default=600)
    p.add_argument("--alias", default="challenger")
    p.add_argument("--ranker-uri", help="rank with this model instead of the alias's (e.g. a run's model)")
    p.add_argument("--catalogue", action="store_true",
                   help="also score the ranker over the whole catalogue (slow: every item, every request)")
    p.add_argument("--hold-numeric", metavar="PREFIX",
                   help="diagnosis: hold the numeric inputs PREFIX_* (user, item) or the one named PREFIX "
                        "(item_ctr) at their train mean at serving")
    p.add_argument("--hold-ids", metavar="FIELDS",
                   help="diagnosis: serve these categorical inputs (comma-separated, e.g. item_idx) as the OOV id "
                        "to the pre-ranker and the ranker (item_idx: the behaviors' item ids too)")
    p.add_argument("--out", default="benchmarks/out/ab_headroom.json")
    a = p.parse_args(argv)
    from abtest.traffic import schedule
    from pipeline.world import get_world
    from training.registry import setup_tracking

    cfg = load(a)
    setup_tracking(cfg.tracking)
    world = get_world(cfg.world)
    store, retriever, preranker, ranker = _stage_models(cfg, a.alias, a.ranker_uri)
    if a.hold_numeric:
        hold_numeric(store, a.hold_numeric)
    if a.hold_ids:
        hold_ids(store, a.hold_ids.split(","))
    s, k = cfg.serve, cfg.abtest.slate_size
    keys = np.arange(1, len(store.item_id))
    keys = keys[np.array([x is not None for x in store.item_id[keys]])]
    ids = np.array([int(x) for x in store.item_id[keys]])
    pop = np.array([int(x) for x in store.item_ids(store.popular[:k])])
    users = world.users_table()
    users = users[users["registered_ts"] < world.log_end_ts]["user_id"].to_numpy()
    rng = np.random.default_rng(cfg.abtest.seed)
    pos = np.arange(k)
    names = ["popularity", "funnel", "ceiling: world's best k of the retrieved", "ceiling: world's best k of the pre-ranked",
             "ranker over all retrieved (no pre-rank cut)", "pre-ranker's own top k",
             "ranker + pre-ranker logits (sum) over the pre-ranked", *map(three_model_row, RETRIEVAL_WEIGHTS),
             "retriever's own top k of the retrieved", "retriever's own top k of the pre-ranked",
             "ranker over the catalogue",
             "oracle blind to the short-term interest", "oracle on long-term affinity + item bias only",
             "oracle (world's top k)"]
    if not a.catalogue:
        names.remove("ranker over the catalogue")
    per_user = {n: [] for n in names}
    decomp: dict[str, list] = {"pre-ranker (LREA) over the retrieved": [], "ranker over the pre-ranked": [],
                               "ranker over the retrieved": [], "retriever over the pre-ranked": []}
    score_sd: list[tuple[float, float, float]] = []  # within-request sd of each stage's score (ranker, pre-ranker, retriever)
    t0 = time.time()
    for u in tqdm(rng.choice(users, min(a.users, len(users)), replace=False), desc="users", unit="user",
                  disable=not sys.stderr.isatty()):
        uk = int(store.user_keys([str(u)])[0])
        recent: list[int] = []
        recent_ts: list[int] = []
        sums = dict.fromkeys(names, 0.0)
        times = schedule(world, cfg.abtest.requests_per_user, rng)
        for ts in times:
            ts = int(ts)
            hist, hist_ts = store.user_history_ts(uk, recent=np.array(recent, dtype=np.int64),
                                                  recent_ts=np.array(recent_ts, dtype=np.int64))

            def ctr(items: np.ndarray, ts: int = ts, u: int = int(u)) -> np.ndarray:
                return world.click_probabilities(np.full(len(items), u), items, pos[: len(items)],
                                                 np.full(len(items), ts))

            def best_of(item_keys: np.ndarray, ts: int = ts, u: int = int(u)) -> float:
                """The world's own best k among these candidates, served in its order."""
                cand = np.array([int(x) for x in store.item_ids(item_keys)])
                p0 = world.click_probabilities(np.full(len(cand), u), cand, np.zeros(len(cand)), np.full(len(cand), ts))
                return float(ctr(cand[np.argsort(-p0)[:k]]).mean())

            got = retriever.retrieve(uk, hist, s.retrieve_top_n)
            pre = preranker.prerank(uk, hist, got, s.prerank_top_m, ts)
            slate = np.array([int(x) for x in store.item_ids(  # as served: with serve.prerank_weight's fusion
                ranker.rank(uk, hist, pre.keys, k, ts, hist_ts, pre.scores if s.prerank_weight else None).keys)])
            p_funnel = ctr(slate)
            sums["funnel"] += float(p_funnel.mean())
            sums["ceiling: world's best k of the retrieved"] += best_of(got.keys)
            sums["ceiling: world's best k of the pre-ranked"] += best_of(pre.keys)
            wide = ranker.rank(uk, hist, got.keys, k, ts, hist_ts).keys
            sums["ranker over all retrieved (no pre-rank cut)"] += float(
                ctr(np.array([int(x) for x in store.item_ids(wide)])).mean())
            sums["popularity"] += float(ctr(pop).mean())
            sums["pre-ranker's own top k"] += float(ctr(np.array([int(x) for x in store.item_ids(pre.keys[:k])])).mean())
            full = ranker.rank(uk, hist, pre.keys, len(pre.keys), ts, hist_ts)  # every pre-ranked candidate's p
            lrea = dict(zip(pre.keys.tolist(), pre.scores.tolist(), strict=True))
            q = np.clip(full.scores.astype(np.float64), 1e-6, 1 - 1e-6)
            z_rank = np.log(q / (1 - q))  # the ranker's logits, in full's order
            fused = z_rank + np.array([lrea[x] for x in full.keys.tolist()])
            sums["ranker + pre-ranker logits (sum) over the pre-ranked"] += float(
                ctr(np.array([int(x) for x in store.item_ids(full.keys[np.argsort(-fused, kind="stable")[:k]])])).mean())
            ret = dict(zip(pre.keys.tolist(), got.scores[pre.pos].tolist(), strict=True))  # the retriever's score
            ret_full = np.array([ret[x] for x in full.keys.tolist()])
            lrea_only = fused - s.retrieval_weight * ret_full  # the sum with the pre-ranker's own logit, whatever the config's w
            for w3 in RETRIEVAL_WEIGHTS:
                top3 = full.keys[np.argsort(-(lrea_only + w3 * ret_full), kind="stable")[:k]]
                sums[three_model_row(w3)] += float(ctr(np.array([int(x) for x in store.item_ids(top3)])).mean())
            for name, cand, sc in (("retriever's own top k of the retrieved", got.keys, got.scores),
                                   ("retriever's own top k of the pre-ranked", full.keys, ret_full)):
                sums[name] += float(ctr(np.array([int(x) for x in store.item_ids(cand[np.argsort(-sc, kind="stable")[:k]])])).mean())
            score_sd.append((float(np.std(z_rank)), float(np.std(pre.scores)), float(np.std(ret_full))))
            if len(decomp["ranker over the pre-ranked"]) < 2000:  # ~2,000 requests are plenty for 4 weights
                def logit(p: np.ndarray) -> np.ndarray:
                    p = np.clip(p.astype(np.float64), 1e-6, 1 - 1e-6)
                    return np.log(p / (1 - p))

                allp = preranker.prerank(uk, hist, got, len(got.keys), ts)
                decomp["pre-ranker (LREA) over the retrieved"].append(
                    (world_terms(world, int(u), np.array([int(x) for x in store.item_ids(allp.keys)]), ts), allp.scores))
                decomp["retriever over the pre-ranked"].append(
                    (world_terms(world, int(u), np.array([int(x) for x in store.item_ids(pre.keys)]), ts), got.scores[pre.pos]))
                for name, cand in (("ranker over the pre-ranked", pre.keys), ("ranker over the retrieved", allp.keys)):
                    r = ranker.rank(uk, hist, cand, len(cand), ts, hist_ts)
                    decomp[name].append((world_terms(world, int(u), np.array([int(x) for x in store.item_ids(r.keys)]), ts),
                                         logit(r.scores)))
            if "ranker over the catalogue" in sums:
                top = ranker.rank(uk, hist, keys, k, ts, hist_ts).keys
                sums["ranker over the catalogue"] += float(ctr(np.array([int(x) for x in store.item_ids(top)])).mean())
            p_all = world.click_probabilities(np.full(len(ids), u), ids, np.zeros(len(ids)), np.full(len(ids), ts))
            sums["oracle (world's top k)"] += float(ctr(ids[np.argsort(-p_all)[:k]]).mean())
            terms = world_terms(world, int(u), ids, ts)
            terms[p_all == 0] = -np.inf  # not released yet
            sums["oracle blind to the short-term interest"] += float(
                ctr(ids[np.argsort(-(terms[:, 0] + terms[:, 2] + terms[:, 3]))[:k]]).mean())
            sums["oracle on long-term affinity + item bias only"] += float(
                ctr(ids[np.argsort(-(terms[:, 0] + terms[:, 3]))[:k]]).mean())
            clicked = rng.random(len(slate)) < p_funnel  # the funnel arm's clicks, fed back
            recent += store.item_keys([str(x) for x in slate[clicked]]).tolist()
            recent_ts += [ts] * int(clicked.sum())
        for n in names:
            per_user[n].append(sums[n] / len(times))
    base = np.array(per_user["popularity"])
    out: dict[str, dict[str, float]] = {}
    for n in names:
        v = np.array(per_user[n])
        d = v - base  # paired per user: the lift's CI
        lift, se = d.mean() / base.mean(), d.std(ddof=1) / np.sqrt(len(d)) / base.mean()
        out[n] = {"mean_ctr": float(v.mean()), "se": float(v.std(ddof=1) / np.sqrt(len(v))), "lift": float(lift),
                  "lift_ci95": [float(lift - 1.96 * se), float(lift + 1.96 * se)]}
    # A/B size: two independent arms of n users each; per-user CTR sd from the replay
    sd = float(np.sqrt((np.var(per_user["funnel"], ddof=1) + np.var(base, ddof=1)) / 2))
    eff = out["funnel"]["mean_ctr"] - out["popularity"]["mean_ctr"]
    need = int(np.ceil(2 * ((1.96 + 0.84) * sd / eff) ** 2)) if eff > 0 else None
    w = max(len(n) for n in out) + 2
    print(f"{'slate':<{w}}{'true CTR':>10}{'± se':>8}{'lift vs popularity (95% CI)':>34}")
    for n, v in out.items():
        ci = f"{v['lift']:+.1%} ({v['lift_ci95'][0]:+.1%} … {v['lift_ci95'][1]:+.1%})"
        print(f"{n:<{w}}{v['mean_ctr']:>10.4f}{v['se']:>8.4f}{ci:>34}")
    print(f"users per arm to detect the funnel's lift (α 0.05, power 0.8, {cfg.abtest.requests_per_user} requests "
          f"per user): {need if need else 'no positive lift to detect'}  [{time.time() - t0:.0f} s]")
    ssd = np.mean(score_sd, axis=0) if score_sd else np.zeros(3)
    print(f"within-request sd of the scores over the pre-ranked: ranker logit {ssd[0]:.3f}, pre-ranker {ssd[1]:.3f}, "
          f"retriever {ssd[2]:.3f}")
    weights = {n: term_weights(rows) for n, rows in decomp.items() if rows}
    print("\nwhat each stage's scores carry of the world's logit terms (within-request least squares; the world = 1 each):")
    print(f"{'stage':<40}" + "".join(f"{t:>12}" for t in TERMS) + f"{'R²':>8}")
    for n, wt in weights.items():
        print(f"{n:<40}" + "".join(f"{wt[t]:>12.3f}" for t in TERMS) + f"{wt['r2']:>8.3f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"users": a.users, "alias": a.alias, "ranker_uri": a.ranker_uri,
                                       "requests_per_user": cfg.abtest.requests_per_user, "slates": out,
                                       "users_per_arm_needed": need, "term_weights": weights,
                                       "score_sd_within_request": dict(zip(("ranker", "preranker", "retriever"),
                                                                           map(float, ssd), strict=True))}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
