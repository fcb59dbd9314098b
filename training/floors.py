"""Honest floors for every ranking table: models a deep model must beat on the same features.

- `heuristic`: no training — the past-only smoothed item and user click rates, combined as
  log-odds (the pipeline's counters already shrink each rate to the train prior).
- `logistic`: logistic regression on the numeric features (log1p counts, rates, state
  signals) plus one-hot context fields.
- `gbdt`: histogram gradient-boosted trees on the same columns, categorical fields native.

All read the ranking examples' columns directly (no histories): if a sequence model does
not beat them, the fidelity report says so.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from models.spec import FeatureSpec
from training.metrics import auc, gauc, logloss

CONTEXT = ("position", "hour", "dow")


def _numeric(df: pd.DataFrame, spec: FeatureSpec) -> np.ndarray:
    cols = []
    for name, transform in spec.numeric.items():
        x = df[name].to_numpy(dtype=np.float64)
        cols.append(np.log1p(np.maximum(x, 0)) if transform == "log1p" else x)
    return np.stack(cols, 1)


def heuristic_scores(df: pd.DataFrame) -> np.ndarray:
    """log-odds(item CTR) + log-odds(user CTR): a click-rate prior with no training."""
    logit = lambda p: np.log(np.clip(p, 1e-6, 1 - 1e-6) / (1 - np.clip(p, 1e-6, 1 - 1e-6)))  # noqa: E731
    return logit(df["item_ctr"].to_numpy()) + logit(df["user_ctr"].to_numpy())


def _metrics(df: pd.DataFrame, score: np.ndarray, prob: np.ndarray | None) -> dict[str, float]:
    y = df["label"].to_numpy()
    out = {"auc": auc(y, score), "gauc": gauc(y, score, df["user_key"].to_numpy())}
    if prob is not None:
        out["logloss"] = logloss(y, prob)
    return out


def evaluate_floors(train: pd.DataFrame, test: pd.DataFrame, spec: FeatureSpec, seed: int = 0) -> dict[str, dict]:
    """{"heuristic": metrics, "logistic": metrics, "gbdt": metrics} on `test`."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    ctx = [c for c in CONTEXT if c in spec.categorical]
    y = train["label"].to_numpy()
    res = {"heuristic": _metrics(test, heuristic_scores(test), None)}

    scaler = StandardScaler().fit(_numeric(train, spec))
    onehot = OneHotEncoder(handle_unknown="ignore").fit(train[ctx]) if ctx else None

    def lin(df: pd.DataFrame) -> np.ndarray:
        parts = [scaler.transform(_numeric(df, spec))]
        if onehot is not None:
            parts.append(onehot.transform(df[ctx]).toarray())
        return np.concatenate(parts, 1)

    lr = LogisticRegression(max_iter=500).fit(lin(train), y)
    p = lr.predict_proba(lin(test))[:, 1]
    res["logistic"] = _metrics(test, p, p)

    def trees(df: pd.DataFrame) -> np.ndarray:
        return np.concatenate([_numeric(df, spec), df[ctx].to_numpy(dtype=np.float64)], 1) if ctx else _numeric(df, spec)

    n_num = len(spec.numeric)
    cat_mask = np.r_[np.zeros(n_num, bool), np.ones(len(ctx), bool)]
    gb = HistGradientBoostingClassifier(max_iter=200, learning_rate=0.1, categorical_features=cat_mask,
                                        early_stopping=True, random_state=seed).fit(trees(train), y)
    p = gb.predict_proba(trees(test))[:, 1]
    res["gbdt"] = _metrics(test, p, p)
    return res
