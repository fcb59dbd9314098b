"""The ground-truth world: items, users, and the click model.

One `World` generates the training logs (pipeline/simulator.py) and answers the
simulated A/B test, so a model that learns the world better wins the A/B.

Everything is a deterministic function of `WorldConfig`:

- latent space R^K; category centres μ_c ~ N(0, I); brand centres
  ν_b = μ_c + 0.5·N(0, I); item vectors v_i = ν_b + s_style + 0.35·N(0, I);
  item bias β_i = standardised log Zipf weight; ~30% of items arrive after the
  log start (cold start), some only during the A/B horizon.
- titles: brand word + 2–3 words of the category's vocabulary (neighbouring
  categories share a few words) + style and colour words + a filler word.
- users: age group, gender, city; category prior logits = A[age] + G[gender] +
  0.5·C[city]; three long-term categories drawn from that prior with Dirichlet
  weights, u_long = Σ w_m μ_m + N(0, 0.3²·I); one dormant category, active in the
  first and the last quarter of the log horizon and during the A/B; a short-term
  category following a sticky Markov chain over fixed time epochs.
- click: p = σ(a₀ + γ·⟨u_t, v_i⟩/√K + b·β_i − pos_bias·position), with
  u_t = 0.5·u_long + 0.4·μ_short(t) + 0.3·1[dormant active]·μ_dormant.

User state at time t is a pure function of (seed, user, t): the short-term
chain is driven by a counter-based hash, not by a sequential generator, so the
A/B test can ask `click_probabilities` about any user at any time and get the
state the logs would have continued into.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict

import numpy as np
import pandas as pd

from configs import WorldConfig

DAY = 86_400
_CHAIN_WINDOW = 48  # epochs scanned back for the last jump; P(no jump) = stay^48 ≈ 2e-5
_AGE_GROUPS = np.array(["<18", "18-24", "25-34", "35-44", "45-54", "55+"])
_AGE_P = np.array([0.06, 0.22, 0.30, 0.20, 0.13, 0.09])
_NUM_CITIES = 20
_COLORS = np.array(["red", "blue", "green", "black", "white", "grey", "pink", "brown", "beige", "navy"])
_FILLERS = np.array(["new", "classic", "premium", "basic", "deluxe", "original", "pro", "mini", "plus", "edition"])


# --------------------------------------------------------------------------- counter-based randomness


_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _splitmix(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def hash_uniform(seed: int, stream: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) as a pure function of (seed, stream, a, b), elementwise."""
    with np.errstate(over="ignore"):
        h = _splitmix(np.full(np.shape(a), seed * 1_000_003 + stream, dtype=np.uint64))
        h = _splitmix(h ^ np.asarray(a).astype(np.int64).astype(np.uint64))
        h = _splitmix(h ^ np.asarray(b).astype(np.int64).astype(np.uint64))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _pseudo_words(rng: np.random.Generator, n: int, syllables: int = 2) -> list[str]:
    cons = list("bdfgklmnprstvz")
    vows = list("aeiou")
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        w = "".join(rng.choice(cons) + rng.choice(vows) for _ in range(syllables))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class World:
    """The simulator's ground truth. Build once per process with `get_world(cfg)`.

    Public API used by the A/B test:
      - `click_probabilities(user_ids, item_ids, positions, ts) -> (n,) float`
      - `sample_clicks(user_ids, item_ids, positions, ts, rng) -> (n,) bool`
      - `available_items(ts) -> item ids released at or before ts`
      - `items_table()`, `users_table()`: the canonical tables.
    """

    def __init__(self, cfg: WorldConfig):
        self.cfg = cfg
        rng = np.random.default_rng([cfg.seed, 0])
        K, C, bpc = cfg.latent_dim, cfg.num_categories, cfg.brands_per_category
        self.start_ts = cfg.start_ts
        self.log_end_ts = cfg.start_ts + cfg.log_days * DAY
        self.ab_end_ts = self.log_end_ts + cfg.ab_days * DAY

        # --- categories, brands, styles
        self.cat_centers = rng.normal(size=(C, K))
        nb = C * bpc
        self.brand_cat = np.repeat(np.arange(C), bpc)
        self.brand_centers = self.cat_centers[self.brand_cat] + 0.5 * rng.normal(size=(nb, K))
        styles_per_cat = 4
        self.style_vecs = 0.3 * rng.normal(size=(C * styles_per_cat, K))

        words = _pseudo_words(rng, C * 10 + nb + C * styles_per_cat + C, syllables=3)
        cat_words = np.array(words[: C * 10]).reshape(C, 10)
        # Neighbouring categories share two words: titles are informative, not a perfect key.
        self.cat_vocab = [list(cat_words[c]) + list(cat_words[(c + 1) % C][:2]) for c in range(C)]
        off = C * 10
        self.brand_names = np.array([w.capitalize() for w in words[off : off + nb]])
        off += nb
        self.style_names = np.array(words[off : off + C * styles_per_cat])
        off += C * styles_per_cat
        self.cat_names = np.array(words[off : off + C])

        # --- items
        n = cfg.num_items
        cat_p = rng.dirichlet(np.full(C, 3.0))
        item_cat = rng.choice(C, size=n, p=cat_p)
        item_brand = item_cat * bpc + rng.integers(0, bpc, size=n)
        item_style = item_cat * styles_per_cat + rng.integers(0, styles_per_cat, size=n)
        item_color = rng.integers(0, len(_COLORS), size=n)
        self.item_vecs = (
            self.brand_centers[item_brand] + self.style_vecs[item_style] + 0.35 * rng.normal(size=(n, K))
        )
        rank = rng.permutation(n) + 1
        pop_w = rank.astype(np.float64) ** (-cfg.zipf_s)
        logw = np.log(pop_w)
        self.item_bias = (logw - logw.mean()) / logw.std()
        self.item_pop = pop_w / pop_w.sum()
        is_new = rng.random(n) < cfg.new_item_frac
        old_ts = cfg.start_ts - rng.integers(DAY, 365 * DAY, size=n)
        new_ts = rng.integers(cfg.start_ts, self.ab_end_ts, size=n)
        self.item_first_seen = np.where(is_new, new_ts, old_ts).astype(np.int64)
        brand_price = np.exp(rng.normal(3.0, 0.8, size=nb))
        self.item_price = np.round(brand_price[item_brand] * np.exp(0.25 * rng.normal(size=n)), 2)
        self.item_cat, self.item_brand = item_cat, item_brand
        self.item_style, self.item_color = item_style, item_color
        self.item_ids = np.arange(1, n + 1, dtype=np.int64)  # raw ids as a log would carry them
        self._titles = self._make_titles(rng)

        # Item lookup structures for the logging policy (sorted by arrival).
        self._arrival_order = np.argsort(self.item_first_seen, kind="stable")
        self._arrival_ts = self.item_first_seen[self._arrival_order]
        self._arrival_cumw = np.cumsum(pop_w[self._arrival_order])
        cat_order = np.lexsort((self.item_first_seen, item_cat))
        self._cat_order = cat_order
        self._cat_key = item_cat[cat_order].astype(np.int64) * (1 << 40) + self.item_first_seen[cat_order]
        self._cat_offset = np.searchsorted(item_cat[cat_order], np.arange(C + 1))
        self._cat_cumw = np.concatenate([[0.0], np.cumsum(pop_w[cat_order])])

        # --- users
        m = cfg.num_users
        age = rng.choice(len(_AGE_GROUPS), size=m, p=_AGE_P)
        gender = rng.integers(0, 2, size=m)
        city_w = 1.0 / np.arange(1, _NUM_CITIES + 1)
        city = rng.choice(_NUM_CITIES, size=m, p=city_w / city_w.sum())
        A = rng.normal(0, 1.5, size=(len(_AGE_GROUPS), C))
        G = rng.normal(0, 1.5, size=(2, C))
        Ci = rng.normal(0, 1.0, size=(_NUM_CITIES, C))
        prior = A[age] + G[gender] + 0.5 * Ci[city]  # (m, C)
        # Categories without replacement from softmax(prior): Gumbel top-k.
        gumbel = prior + rng.gumbel(size=(m, C))
        order = np.argsort(-gumbel, axis=1)
        n_long = min(3, C - 1)
        self.user_long_cats = order[:, :n_long]
        self.user_long_w = rng.dirichlet(np.ones(n_long), size=m)
        self.user_dormant = order[:, n_long]
        self.user_long_vec = (
            np.einsum("um,umk->uk", self.user_long_w, self.cat_centers[self.user_long_cats])
            + 0.3 * rng.normal(size=(m, K))
        )
        self.user_age, self.user_gender, self.user_city = age, gender, city
        is_new_user = rng.random(m) < cfg.new_user_frac
        self.user_registered = np.where(
            is_new_user,
            rng.integers(cfg.start_ts, self.log_end_ts, size=m),
            cfg.start_ts - rng.integers(DAY, 3 * 365 * DAY, size=m),
        ).astype(np.int64)
        # Zipf activity: active days ~ ceil(Pareto(alpha)), capped by the days available.
        self.user_active_days = np.ceil(rng.pareto(cfg.activity_alpha, size=m) + 1.0).astype(np.int64)
        self.user_ids = np.arange(1, m + 1, dtype=np.int64)

    # ----------------------------------------------------------------- tables

    def _make_titles(self, rng: np.random.Generator) -> np.ndarray:
        """Titles, vectorised: brand, 2–3 distinct category words, style, colour, filler."""
        n = self.cfg.num_items
        vocab = np.array(self.cat_vocab)  # (C, V)
        picks = np.argsort(rng.random((n, vocab.shape[1])), axis=1)[:, :3]  # 3 distinct word slots
        words = vocab[self.item_cat[:, None], picks]  # (n, 3)
        third = np.where(rng.integers(2, 4, size=n) == 3, " " + words[:, 2].astype(object), "")
        filler = _FILLERS[rng.integers(len(_FILLERS), size=n)]
        parts = [
            self.brand_names[self.item_brand].astype(object),
            " " + words[:, 0].astype(object),
            " " + words[:, 1].astype(object),
            third,
            " " + self.style_names[self.item_style].astype(object),
            " " + _COLORS[self.item_color].astype(object),
            " " + filler.astype(object),
        ]
        out = parts[0]
        for p in parts[1:]:
            out = out + p
        return out

    def items_table(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "item_id": self.item_ids,
                "category": self.cat_names[self.item_cat],
                "brand": self.brand_names[self.item_brand],
                "title": self._titles,
                "price": self.item_price,
                "color": _COLORS[self.item_color],
                "style": self.style_names[self.item_style],
                "first_seen_ts": self.item_first_seen,
            }
        )

    def users_table(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "user_id": self.user_ids,
                "age": _AGE_GROUPS[self.user_age],
                "gender": np.where(self.user_gender == 0, "F", "M"),
                "city": np.array([f"city_{c:02d}" for c in range(_NUM_CITIES)])[self.user_city],
                "registered_ts": self.user_registered,
            }
        )

    # ----------------------------------------------------------------- user state

    def _epoch(self, ts: np.ndarray) -> np.ndarray:
        return np.maximum(0, (np.asarray(ts, dtype=np.int64) - self.start_ts) // (self.cfg.short_epoch_hours * 3600))

    def _chain_candidate(self, u: np.ndarray, e: np.ndarray) -> np.ndarray:
        """The category the chain jumps to at epoch e: mostly a long-term one, rarely anywhere."""
        cfg = self.cfg
        r_kind = hash_uniform(cfg.seed, 2, u, e)
        r_pick = hash_uniform(cfg.seed, 3, u, e)
        cumw = np.cumsum(self.user_long_w[u], axis=-1)
        m = np.minimum((r_pick[..., None] > cumw).sum(-1), cumw.shape[-1] - 1)
        long_cat = np.take_along_axis(self.user_long_cats[u], m[..., None], axis=-1)[..., 0]
        any_cat = np.minimum((r_pick * cfg.num_categories).astype(np.int64), cfg.num_categories - 1)
        return np.where(r_kind < 0.85, long_cat, any_cat)

    def short_term_category(self, user_rows: np.ndarray, ts: np.ndarray) -> np.ndarray:
        """Short-term category of each (user row, ts): a sticky Markov chain over epochs.

        At each epoch the chain jumps with probability 1 − stay; the state is the
        candidate drawn at the last jump at or before the epoch (epoch 0 always jumps).
        """
        u = np.asarray(user_rows, dtype=np.int64)
        e = self._epoch(ts)
        back = np.arange(_CHAIN_WINDOW)
        ee = e[:, None] - back[None, :]  # (n, W)
        uu = np.broadcast_to(u[:, None], ee.shape)
        jump = (hash_uniform(self.cfg.seed, 1, uu, ee) >= self.cfg.short_stay_prob) | (ee <= 0)
        first = np.argmax(jump, axis=1)  # 0 when none jumped: the window's fallback
        e_jump = np.maximum(e - first, 0)
        return self._chain_candidate(u, e_jump)

    def dormant_active(self, ts: np.ndarray) -> np.ndarray:
        span = self.log_end_ts - self.start_ts
        t = np.asarray(ts, dtype=np.int64)
        return (t < self.start_ts + span // 4) | (t >= self.start_ts + (3 * span) // 4)

    def user_vectors(self, user_rows: np.ndarray, ts: np.ndarray) -> np.ndarray:
        """u_t = 0.5·u_long + 0.4·μ_short(t) + 0.3·1[dormant active]·μ_dormant, (n, K)."""
        u = np.asarray(user_rows, dtype=np.int64)
        short = self.short_term_category(u, ts)
        dorm = self.dormant_active(ts).astype(np.float64)[:, None]
        return (
            0.5 * self.user_long_vec[u]
            + 0.4 * self.cat_centers[short]
            + 0.3 * dorm * self.cat_centers[self.user_dormant[u]]
        )

    # ----------------------------------------------------------------- click model (public)

    def user_rows(self, user_ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(user_ids, dtype=np.int64)
        if ids.size and (ids.min() < 1 or ids.max() > self.cfg.num_users):
            raise KeyError(f"user ids outside this world's 1..{self.cfg.num_users}")
        return ids - 1

    def item_rows(self, item_ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(item_ids, dtype=np.int64)
        if ids.size and (ids.min() < 1 or ids.max() > self.cfg.num_items):
            raise KeyError(f"item ids outside this world's 1..{self.cfg.num_items}")
        return ids - 1

    def click_logits_rows(self, u: np.ndarray, i: np.ndarray, positions: np.ndarray, ts: np.ndarray) -> np.ndarray:
        cfg = self.cfg
        ut = self.user_vectors(u, ts)
        aff = np.einsum("nk,nk->n", ut, self.item_vecs[i]) / np.sqrt(cfg.latent_dim)
        return (
            cfg.base_logit
            + cfg.affinity_scale * aff
            + cfg.item_bias_scale * self.item_bias[i]
            - cfg.position_bias * np.asarray(positions)
        )

    def click_probabilities(
        self, user_ids: np.ndarray, item_ids: np.ndarray, positions: np.ndarray, ts: np.ndarray
    ) -> np.ndarray:
        """P(click) for each (user, item, position, ts), elementwise, shape (n,).

        An item not yet released at ts gets probability 0 (it cannot be shown).
        """
        u, i = self.user_rows(user_ids), self.item_rows(item_ids)
        ts = np.broadcast_to(np.asarray(ts, dtype=np.int64), u.shape)
        positions = np.broadcast_to(np.asarray(positions), u.shape)
        p = sigmoid(self.click_logits_rows(u, i, positions, ts))
        return np.where(self.item_first_seen[i] <= ts, p, 0.0)

    def sample_clicks(self, user_ids, item_ids, positions, ts, rng: np.random.Generator) -> np.ndarray:
        return rng.random(np.shape(user_ids)) < self.click_probabilities(user_ids, item_ids, positions, ts)

    def available_items(self, ts: int) -> np.ndarray:
        n = np.searchsorted(self._arrival_ts, ts, side="right")
        return self.item_ids[self._arrival_order[:n]]

    # ----------------------------------------------------------------- logging-policy helpers

    def sample_popular(self, ts: np.ndarray, r: np.ndarray) -> np.ndarray:
        """Popularity-weighted item rows among items released by ts (one per ts)."""
        n = np.maximum(np.searchsorted(self._arrival_ts, ts, side="right"), 1)
        x = r * self._arrival_cumw[n - 1]
        j = np.minimum(np.searchsorted(self._arrival_cumw, x, side="right"), n - 1)
        return self._arrival_order[j]

    def sample_uniform(self, ts: np.ndarray, r: np.ndarray) -> np.ndarray:
        n = np.maximum(np.searchsorted(self._arrival_ts, ts, side="right"), 1)
        return self._arrival_order[np.minimum((r * n).astype(np.int64), n - 1)]

    def sample_in_category(self, cat: np.ndarray, ts: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Popularity-weighted item rows of category `cat` released by ts; ok=False where none is."""
        lo = self._cat_offset[cat]
        hi = np.searchsorted(self._cat_key, cat.astype(np.int64) * (1 << 40) + ts, side="right")
        ok = hi > lo
        base = self._cat_cumw[lo]
        x = base + r * (self._cat_cumw[np.maximum(hi, lo + 1)] - base)
        j = np.clip(np.searchsorted(self._cat_cumw, x, side="right") - 1, lo, np.maximum(hi - 1, lo))
        j = np.minimum(j, len(self._cat_order) - 1)
        return self._cat_order[j], ok


def _config_key(cfg: WorldConfig) -> str:
    return json.dumps(asdict(cfg), sort_keys=True)


@functools.lru_cache(maxsize=4)
def _world_from_key(key: str) -> World:
    return World(WorldConfig(**json.loads(key)))


def get_world(cfg: WorldConfig) -> World:
    """The world for `cfg`, built once per process (Ray workers reuse it across blocks)."""
    return _world_from_key(_config_key(cfg))
