"""LREA (training vs absorbed serving path) and SIM hard search."""

import torch

from models import build_model
from models.lrea import LREA, LREAConfig, serving_gap
from models.sim_hard import hard_search
from tests.models.conftest import make_batch


def _nonnegative(m: LREA) -> LREA:
    """Weights for which eq. 6 holds exactly: everything inside φ is non-negative."""
    with torch.no_grad():
        for t in m.embedding.tables.values():
            t.weight.abs_()
        m.embedding.num_w.abs_()
        m.embedding.num_b.abs_()
        m.w_comp.abs_()
        m.w_decomp.abs_()
        m.w2.weight.abs_()
        m.w3.weight.abs_()
    return m.eval()


def test_serving_path_equals_training_path_under_nonnegative_weights(spec):
    torch.manual_seed(0)
    m = _nonnegative(LREA(spec, LREAConfig.tiny()))
    batch = make_batch(spec, B=16, seed=5)
    gap = serving_gap(m, batch)
    assert gap["interest_rel_gap"] < 1e-5 and gap["logit_abs_gap"] < 1e-5
    # and through the public API: absorb one user's history, score candidates
    with torch.no_grad():
        train_logits = m(batch).logits
        for b in range(4):
            one = {k: v[b : b + 1] for k, v in batch.items()}
            cache = m.absorb_batch(one)
            cand = {k: v[b : b + 1] for k, v in batch.items() if not k.startswith("hist_")}
            assert torch.allclose(m.score(cache, cand), train_logits[b : b + 1], atol=1e-5)


def test_gap_is_reported_when_weights_are_signed(spec):
    torch.manual_seed(0)
    m = LREA(spec, LREAConfig.tiny())
    with torch.no_grad():
        m.w_decomp.normal_()  # break eq. 6
    gap = serving_gap(m, make_batch(spec, B=16, seed=5))
    assert gap["interest_rel_gap"] > 1e-3


def test_non_negativity_term_penalises_only_negative_entries(spec):
    torch.manual_seed(0)
    m = LREA(spec, LREAConfig.tiny())
    batch = make_batch(spec, B=8)
    before = m(batch).aux["non_neg"].item()  # E_comp's term only: W_decomp starts non-negative
    with torch.no_grad():
        m.w_decomp[0, 0] = -2.0
    assert abs(m(batch).aux["non_neg"].item() - before - 4.0) < 1e-4  # ‖max(0, −W)‖² gains 2²
    with torch.no_grad():
        m.w_decomp[0, 0] = 5.0
    assert abs(m(batch).aux["non_neg"].item() - before) < 1e-6  # positive entries cost nothing
    assert m.loss_weights() == {"non_neg": 0.3}


def test_absorbed_cache_has_no_length_dimension(spec):
    m = LREA(spec, LREAConfig.tiny())
    cache = m.absorb_batch(make_batch(spec, B=3))
    r, db = cache.c2.shape[1], 3 * m.cfg.embed_dim
    assert 0 < r <= m.cfg.rank
    assert cache.e_comp.shape == (3, db, r) and cache.e_aux.shape == (3, db, r)
    assert cache.e_sum.shape == (3, db) and cache.c2.shape == (3, r)


def test_rank_columns_no_user_reads_are_dropped_and_scores_do_not_move(spec):
    """r > L (the default: r 64, L 50 on the small world): the recency-bucket init leaves r − L columns
    of W_comp and rows of W_decomp at zero for good; the cache drops them, exactly."""
    torch.manual_seed(0)
    m = LREA(spec, LREAConfig(embed_dim=8, rank=spec.seq_len + 5, attention_hidden=8, hidden=[16])).eval()
    with torch.no_grad():
        m.w3.weight.normal_()  # signed, as after training
    batch = make_batch(spec, B=6, seed=2, lens=[spec.seq_len] * 6)
    with torch.no_grad():
        cache = m.absorb_batch(batch)
        assert cache.c2.shape[1] == spec.seq_len
        emb = m.embed(batch)
        e_s, e_comp = m.compress(emb.seq, emb.seq_mask)
        assert torch.allclose(m.interest_serve(cache, emb.target(), torch.arange(6)),
                              m.interest_train(emb.target(), e_s, e_comp), atol=1e-5)


def test_one_user_fast_path_equals_the_indexed_path(spec):
    """`score(cache, cands)` for one user's N candidates (E_comp folded into W_3) = the per-candidate
    gathered path, on signed weights where eq. 9 is only approximate."""
    torch.manual_seed(0)
    m = LREA(spec, LREAConfig.tiny()).eval()
    with torch.no_grad():
        m.w_decomp.normal_()
        m.w_comp.normal_()
        m.w3.weight.normal_()
    batch = make_batch(spec, B=9, seed=4, lens=[spec.seq_len] * 9)
    with torch.no_grad():
        cache = m.absorb_batch({k: v[1:2] for k, v in batch.items()})  # row 0 of make_batch has no history
        e_t = m.embed(batch).target()
        fast = m.interest_serve(cache, e_t)
        slow = m.interest_serve(cache, e_t, torch.zeros(9, dtype=torch.long))
    assert torch.allclose(fast, slow, atol=1e-5) and fast.abs().max() > 0


def test_hard_search_keeps_the_most_recent_same_category():
    hist_cat = torch.tensor([[0, 0, 3, 5, 3, 3, 2, 3], [1, 1, 1, 1, 1, 1, 1, 1]])
    mask = torch.tensor([[False, False] + [True] * 6, [True] * 8])
    idx, ok = hard_search(hist_cat, mask, torch.tensor([3, 4]), k=3)
    assert idx[0][ok[0]].tolist() == [7, 5, 4]
    assert not ok[1].any()  # no behavior of category 4


def test_sim_hard_ignores_other_categories(spec):
    torch.manual_seed(0)
    m = build_model("sim_hard", spec, tiny=True).eval()
    batch = make_batch(spec, B=8, seed=3, lens=[spec.seq_len] * 8)
    other = dict(batch)
    same = batch["hist_cat_idx"] == batch["cat_idx"][:, None]
    other["hist_item_idx"] = torch.where(same, batch["hist_item_idx"], torch.randint(1, 60, same.shape))
    with torch.no_grad():
        assert torch.allclose(m(batch).logits, m(other).logits)


def test_absorbed_path_is_exact_at_init_whatever_the_signs(spec):
    """With the recency-bucket init every position reads exactly one bucket, so eq. 9's
    factorisation holds for signed embeddings too: training starts where serving is exact."""
    torch.manual_seed(0)
    m = LREA(spec, LREAConfig.tiny()).eval()
    gap = serving_gap(m, make_batch(spec, B=16, seed=5))
    assert gap["interest_rel_gap"] < 1e-5 and gap["logit_abs_gap"] < 1e-5


def _signed(spec, rank: int = 8) -> LREA:
    """A model whose absorbed path (eq. 9) is inexact: W_decomp signed, as after training."""
    torch.manual_seed(0)
    m = LREA(spec, LREAConfig(embed_dim=8, rank=rank, attention_hidden=8, hidden=[16])).eval()
    with torch.no_grad():
        m.w_decomp.normal_()
        m.w_comp.normal_()
    return m


def _served_logits(m: LREA, batch, users):
    out = []
    with torch.no_grad():
        for b in users:
            one = {k: v[b : b + 1] for k, v in batch.items()}
            cand = {k: v[b : b + 1] for k, v in batch.items() if not k.startswith("hist_")}
            out.append(m.score(m.absorb_batch(one), cand))
    return torch.cat(out)


def test_a_history_shorter_than_the_rank_is_served_by_the_training_path_itself(spec):
    """r ≪ L is the paper's premise ("rank r ≪ L, reducing attention complexity from O(L) to O(r)").
    A user with fewer behaviors than the cache's r' live columns costs less over the behaviors
    themselves, and eq. 5 over them is exact: the served logit equals the training logit even where
    eq. 9's factorisation does not hold."""
    m = _signed(spec, rank=8)
    batch = make_batch(spec, B=8, seed=3, lens=[0, 1, 3, 5, 7, 12, 2, 6])
    assert serving_gap(m, batch)["interest_rel_gap"] > 1e-3  # eq. 9 alone is inexact here
    with torch.no_grad():
        train = m(batch).logits
    short = [0, 1, 2, 3, 4, 6, 7]  # fewer behaviors than r' = 8
    assert torch.allclose(_served_logits(m, batch, short), train[short], atol=1e-5)
    with torch.no_grad():  # the cache holds one column per behavior, not r'
        assert m.absorb_batch({k: v[2:3] for k, v in batch.items()}).e_comp.shape[-1] == 3
        assert m.absorb_batch({k: v[5:6] for k, v in batch.items()}).e_comp.shape[-1] == 8  # 12 ≥ r': eq. 9


def test_the_absorbed_path_is_still_what_serving_gap_measures(spec):
    """serving_gap measures eq. 9 against eq. 5 (the fidelity report's claim), whatever the lengths."""
    m = _signed(spec, rank=8)
    short = make_batch(spec, B=8, seed=3, lens=[0, 1, 3, 2, 1, 2, 3, 1])
    assert serving_gap(m, short)["interest_rel_gap"] > 1e-3
