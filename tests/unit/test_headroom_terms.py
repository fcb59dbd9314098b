"""benchmarks/ab_headroom.py's decomposition of the world's click logit into its terms."""

from __future__ import annotations

import numpy as np

from benchmarks.ab_headroom import TERMS, term_weights, world_terms
from configs import WorldConfig
from pipeline.world import get_world


def test_the_worlds_own_logit_gets_weight_one_on_every_term_and_a_popularity_score_only_on_bias():
    w = get_world(WorldConfig())
    items = np.arange(1, 201)
    ts = w.log_end_ts + 3_600
    rows = [(t, t.sum(1)) for t in (world_terms(w, u, items, ts) for u in range(1, 30))]
    got = term_weights(rows)
    for name in TERMS:
        assert abs(got[name] - 1.0) < 1e-6, (name, got)
    assert got["r2"] > 1 - 1e-9
    pop = [(t, 2.0 * t[:, 3]) for t, _ in rows]  # a score that is item bias alone, scaled
    got = term_weights(pop)
    assert abs(got["item bias"] - 2.0) < 1e-6 and max(abs(got[n]) for n in TERMS[:3]) < 1e-6
