"""The /recommend stages in-process: ms per request of retrieval, pre-ranking and ranking, and how
LREA's served logits compare with its training path, for LREA's two serving forms.

  python -m benchmarks.recommend_stages [--config configs/small.yaml] [--alias champion] [--users 100]
                                        [--passes 3]

Loads the funnel's three `funnel-<name>@<alias>` models, the processed data's FeatureStore and a
FAISS index built from the retriever, the way a co-located serving replica does. Then it serves
`--users` random users one request per call (retrieve_top_n + popular_n → prerank_top_m → k = 10),
on one thread. The two LREA forms alternate pass by pass in one process (these machines are noisy;
the best pass of each is reported), each served twice: with a cold pre-ranker cache (every user
absorbed in the request) and then warm (the same users again: the cache hit a replica has when
a user comes back with the same history, as every user of serve_load's 500 does):

- `eq. 9 for every user`: the absorbed cache of r' columns for every history (`short_exact=False`);
- `short histories exact`: a history with fewer behaviors than r' is served by eq. 5 itself over
  its behaviors (`models.lrea.LREA.absorb`, the default).

For each form it also scores the pre-ranker's candidates through LREA's training path (the full
forward with the history) and reports the mean |Δ logit| of the served scores against it, and how
many of the served top-M the training path's top-M shares. A request's cost depends on its user's
history length, so compare rows of one run, never across data. Prints a table and writes
benchmarks/out/recommend_stages.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

TS = 1_705_000_000  # the request time benchmarks/serve_load.py sends
FORMS = {"eq. 9 for every user": False, "short histories exact": True}
CACHES = ("cold", "warm")  # warm: the users' caches absorbed already, as a replica serving them again has


def _pass(stages, reqs, cfg) -> np.ndarray:
    """(3,) ms per request: retrieve, pre-rank, rank."""
    retriever, preranker, ranker = stages
    s, t = cfg.serve, np.zeros(3)
    for u, h, hts in reqs:
        a = time.perf_counter()
        got = retriever.retrieve(u, h, s.retrieve_top_n, TS)
        b = time.perf_counter()
        pre = preranker.prerank(u, h, got, s.prerank_top_m, TS)
        c = time.perf_counter()
        ranker.rank(u, h, pre.keys, 10, TS, hts, pre.scores if s.prerank_weight else None)
        t += [b - a, c - b, time.perf_counter() - c]
    return t / len(reqs) * 1000


def _agreement(model, store, retriever, reqs, cfg, short_exact: bool) -> dict[str, float]:
    """Served LREA logits against the training path's on each request's released candidates."""
    import torch

    gaps, shared = [], []
    m = cfg.serve.prerank_top_m
    with torch.inference_mode():
        for u, h, _ in reqs:
            keys = retriever.retrieve(u, h, cfg.serve.retrieve_top_n, TS).keys
            keys = keys[store.first_seen[keys] <= TS]
            rows = store.ranking_batch(u, h, keys, TS, seq_len=model.spec.seq_len, spec=model.spec)
            train = model(rows).logits
            cache = model.absorb_batch({k: v[:1] for k, v in rows.items()}, short_exact=short_exact)
            served = model.score(cache, {k: v for k, v in rows.items() if not k.startswith("hist_")})
            gaps.append(float((served - train).abs().mean()))
            top_t, top_s = set(torch.topk(train, min(m, len(keys))).indices.tolist()), \
                set(torch.topk(served, min(m, len(keys))).indices.tolist())
            shared.append(len(top_t & top_s) / max(1, len(top_t)))
    return {"mean_abs_logit_gap": float(np.mean(gaps)), "top_m_shared_with_training_path": float(np.mean(shared))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/small.yaml")
    p.add_argument("--alias", default="champion")
    p.add_argument("--users", type=int, default=100)
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--out", default="benchmarks/out/recommend_stages.json")
    a = p.parse_args(argv)

    import torch

    from configs import load_config
    from serving.features import FeatureStore
    from serving.funnel import Preranker, Ranker, Retriever
    from serving.index_build import build_index
    from training.registry import load_model, registered_name, setup_tracking

    torch.set_num_threads(1)
    cfg = load_config(a.config)
    setup_tracking(cfg.tracking)
    s = cfg.serve
    names = {stage: f"{registered_name(n)}@{a.alias}" for stage, n in
             (("retriever", s.retriever), ("preranker", s.preranker), ("ranker", s.ranker))}
    models = {stage: load_model(f"models:/{n}").eval() for stage, n in names.items()}
    store = FeatureStore(cfg.data.output)
    retriever = Retriever(models["retriever"], build_index(models["retriever"], cfg.data.output, s.index_factory),
                          store, s.popular_n)
    ranker = Ranker(models["ranker"], store, s.prerank_weight)
    n_users = len(pd.read_parquet(Path(cfg.data.output) / "users.parquet", columns=["user_id"]))
    rng = np.random.default_rng(0)
    reqs = [(int(u), *store.user_history_ts(int(u))) for u in rng.integers(1, n_users + 1, a.users)]
    lengths = [len(h) for _, h, _ in reqs]
    rank = models["preranker"].cfg.rank
    best: dict[tuple[str, str], np.ndarray] = {}
    for _ in range(a.passes):
        for form, exact in FORMS.items():
            pre = Preranker(models["preranker"], store, s.retrieval_weight, short_exact=exact)
            for cache in CACHES:  # first a cold cache (every user absorbed), then the same users again
                t = _pass((retriever, pre, ranker), reqs, cfg)
                best[form, cache] = np.minimum(best[form, cache], t) if (form, cache) in best else t
    agree = {form: _agreement(models["preranker"], store, retriever, reqs, cfg, exact) for form, exact in FORMS.items()}
    rows = [{"form": form, "cache": cache,
             **dict(zip(("retrieve_ms", "prerank_ms", "rank_ms"), best[form, cache].tolist(), strict=True)),
             "total_ms": float(best[form, cache].sum()), **agree[form]}
            for cache in CACHES for form in FORMS]
    print(f"{', '.join(names.values())}: {a.users} users, history length median {int(np.median(lengths))}, "
          f"p90 {int(np.percentile(lengths, 90))}, max {max(lengths)} (LREA rank {rank}, L "
          f"{models['preranker'].spec.seq_len}); {s.retrieve_top_n} + {s.popular_n} → {s.prerank_top_m} → 10; "
          f"one thread, best of {a.passes} alternated passes")
    print(f"{'LREA form':<24}{'cache':<7}{'retrieve ms':>12}{'prerank ms':>12}{'rank ms':>10}{'total ms':>10}"
          f"{'|Δ logit| vs training path':>28}{'top-M shared':>14}")
    for r in rows:
        print(f"{r['form']:<24}{r['cache']:<7}{r['retrieve_ms']:>12.2f}{r['prerank_ms']:>12.2f}{r['rank_ms']:>10.2f}"
              f"{r['total_ms']:>10.2f}{r['mean_abs_logit_gap']:>28.4f}{r['top_m_shared_with_training_path']:>14.3f}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.machine(),
                               "command": "python -m benchmarks.recommend_stages " + " ".join(argv or sys.argv[1:]),
                               "models": names, "rows": rows, "history_len_median": float(np.median(lengths)),
                               "history_len_p90": float(np.percentile(lengths, 90))}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
