import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from training.metrics import auc, gauc, group_auc, logloss


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 500)
    s = np.round(rng.random(500) + 0.3 * y, 1)  # coarse scores: many ties
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert np.isnan(auc(np.ones(5), np.arange(5)))


def _slow_gauc(y, s, g):
    num = den = 0.0
    for u in np.unique(g):
        m = g == u
        if 0 < y[m].sum() < m.sum():
            num += roc_auc_score(y[m], s[m]) * m.sum()
            den += m.sum()
    return num / den


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gauc_matches_a_slow_per_user_reference(seed):
    rng = np.random.default_rng(seed)
    n = 2000
    g = rng.integers(0, 120, n)
    y = (rng.random(n) < 0.2).astype(int)
    s = np.round(rng.random(n) + 0.4 * y, 2)
    assert gauc(y, s, g) == pytest.approx(_slow_gauc(y, s, g), abs=1e-12)


def test_logloss_and_group_auc():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p = np.clip(rng.random(300), 0.01, 0.99)
    assert logloss(y, p) == pytest.approx(log_loss(y, p), rel=1e-9)
    m = rng.random(300) < 0.5
    got = group_auc(y, p, {"a": m, "b": ~m})
    assert got["a"] == pytest.approx(roc_auc_score(y[m], p[m]))
    assert got["b"] == pytest.approx(roc_auc_score(y[~m], p[~m]))
