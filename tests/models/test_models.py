"""Unit tests of the ranking models: seeded, tiny tensors, CPU, no Ray."""

import pytest
import torch

from models import RANKING, build_model, loss_terms, total_loss
from models.adaf2m2 import AdaF2M2
from models.cdnet import CDNet, CDNetConfig, core_counts, interest_histogram, select_core
from models.dlf import DLF, DLFConfig
from models.spec import FeatureSpec
from tests.models.conftest import HIST_VOCAB, make_batch

ALL = [*RANKING, "adaf2m2:dcnv2", "adaf2m2:dlf", "adaf2m2:cdnet"]
VARIANTS = {
    "cdnet_full": ("cdnet", {**vars(CDNetConfig.tiny()), "full_sequence": True}),
    "cdnet_rcore": ("cdnet", {**vars(CDNetConfig.tiny()), "use_core": False}),
    "cdnet_rgid": ("cdnet", {**vars(CDNetConfig.tiny()), "use_distribution": False}),
    "din_long": ("din", {"embed_dim": 8, "hidden": [32], "attention_hidden": [16], "sequence": "long"}),
    "dlf_ablated": ("dlf", {**vars(DLFConfig.tiny()), "use_gate": False, "use_rli": False, "use_naf": False}),
}


def build(name, spec, seed=0):
    torch.manual_seed(seed)
    if name in VARIANTS:
        base, params = VARIANTS[name]
        return build_model(base, spec, params)
    return build_model(name, spec, tiny=True)


def weights(m):
    return m.loss_weights() if hasattr(m, "loss_weights") else {}


@pytest.mark.parametrize("name", ALL + list(VARIANTS))
def test_output_shapes_and_finite(name, spec, batch):
    m = build(name, spec)
    out = m(batch)
    assert out.logits.shape == (8,) and torch.isfinite(out.logits).all()
    for lg in out.aux_logits.values():
        assert lg.shape == (8, m.cfg.k)


@pytest.mark.parametrize("name", ALL + list(VARIANTS))
def test_padding_does_not_change_outputs(name, spec, batch):
    m = build(name, spec).eval()
    with torch.no_grad():
        a = m(batch).logits
        noisy = dict(batch)
        pad = torch.arange(spec.seq_len)[None, :] < (spec.seq_len - batch["hist_len"])[:, None]
        for f, v in HIST_VOCAB.items():
            noisy[f] = torch.where(pad, torch.randint(1, spec.categorical[v], pad.shape), batch[f])
        b = m(noisy).logits
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("name", ALL + list(VARIANTS))
def test_same_seed_same_output(name, spec, batch):
    a, b = build(name, spec, seed=3).eval(), build(name, spec, seed=3).eval()
    with torch.no_grad():
        assert torch.equal(a(batch).logits, b(batch).logits)


@pytest.mark.parametrize("name", [*ALL, "cdnet_full", "din_long", "dlf_ablated"])
def test_overfits_a_tiny_batch(name, spec):
    batch = make_batch(spec, B=32, seed=1)
    m = build(name, spec)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    first = None
    for _ in range(150):
        loss = total_loss(loss_terms(m(batch), batch["label"]), weights(m))
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    m.eval()
    with torch.no_grad():
        final = loss_terms(m(batch), batch["label"])["main"].item()
    assert final < 0.5 * first, (first, final)


# --------------------------------------------------------------------------- CDNet


def test_topk_selects_exactly_k_valid_positions():
    torch.manual_seed(0)
    B, L = 64, 30
    sim = torch.rand(B, L) * 2 - 1
    lens = torch.randint(0, L + 1, (B,))
    mask = torch.arange(L)[None, :] >= (L - lens)[:, None]
    for ratio in (0.02, 0.1, 0.5, 1.0):
        idx, selected, ste = select_core(sim, mask, ratio, tau=0.1)
        k = core_counts(lens, ratio)
        assert torch.equal(selected.sum(1), k)
        assert (k[lens > 0] >= 1).all() and (k <= lens).all() and (k[lens == 0] == 0).all()
        assert mask.gather(1, idx)[selected].all()  # padding never selected
        assert torch.allclose(ste.sum(1), k.float(), atol=1e-5)  # forward: the hard mask
        for b in range(B):  # the selected are the k largest valid scores
            if k[b]:
                chosen = sim[b, idx[b][selected[b]]]
                rest = sim[b][mask[b]]
                assert chosen.min() >= rest.topk(int(k[b])).values.min() - 1e-6


def test_histogram_counts_sum_to_valid_length():
    torch.manual_seed(0)
    B, L = 16, 20
    sim = torch.rand(B, L) * 2 - 1
    sim[0, 0], sim[0, 1] = -1.0, 1.0  # the interval ends are counted
    lens = torch.randint(0, L + 1, (B,))
    lens[0] = L
    mask = torch.arange(L)[None, :] >= (L - lens)[:, None]
    for bins in (5, 10, 20, 40):
        h = interest_histogram(sim, mask, bins)
        assert torch.equal(h.sum(1), lens.float())


def test_ste_passes_gradient_to_similarity_projections(spec, batch):
    m = build("cdnet", spec)
    m(batch).logits.sum().backward()
    p = m.proj_sim.weight
    assert p.grad is not None and p.grad.abs().sum() > 0


def test_cdnet_ablation_switches_remove_tokens(spec, batch):
    full_L = int(batch["hist_len"].max())  # the batch's longest history: CDNet reads no further (trim_history)
    layouts = {}
    for name in ("cdnet", "cdnet_rcore", "cdnet_rgid", "cdnet_full"):
        m = build(name, spec)
        layouts[name] = m.tokens(m.embed(batch))[3]
    F = spec.num_fields
    k_max = -(-full_L * CDNetConfig.tiny().topk_ratio // 1)
    assert layouts["cdnet"] == {"core": k_max, "distribution": 1, "context": F}
    assert layouts["cdnet_rcore"] == {"core": 0, "distribution": 1, "context": F}
    assert layouts["cdnet_rgid"] == {"core": k_max, "distribution": 0, "context": F}
    assert layouts["cdnet_full"] == {"core": full_L, "distribution": 1, "context": F}


# --------------------------------------------------------------------------- DLF, DIN


def test_dlf_ablation_switches_remove_modules(spec):
    full = build("dlf", spec)
    abl = build("dlf_ablated", spec)
    assert all(layer.gate is not None and layer.naf is not None for layer in full.layers)
    assert all(layer.gate is None for layer in abl.layers)
    # w/o NAF is the paper's ablation: fusion only in the final layer
    assert [layer.naf is not None for layer in abl.layers] == [False] * (len(abl.layers) - 1) + [True]
    n0 = spec.num_fields + 1
    cfg = DLFConfig.tiny()
    # with RLI the low-order block reads X_0 (n_0 tokens) at every layer; without, X_l
    assert [layer.low.mlp.net[0].in_features for layer in full.layers] == [n0 * cfg.rank] * cfg.layers
    n_l = [n0, cfg.n_low + cfg.n_high + cfg.n_implicit]
    assert [layer.low.mlp.net[0].in_features for layer in abl.layers] == [n * cfg.rank for n in n_l]


def test_din_short_ignores_old_behaviors_long_does_not(spec):
    batch = make_batch(spec, B=8, seed=2, lens=[spec.seq_len] * 8)
    old = dict(batch)
    cut = spec.seq_len - spec.short_len
    old["hist_item_idx"] = batch["hist_item_idx"].clone()
    old["hist_item_idx"][:, :cut] = torch.randint(1, spec.categorical["item_idx"], (8, cut))
    short, long_ = build("din", spec).eval(), build("din_long", spec).eval()
    with torch.no_grad():
        assert torch.allclose(short(batch).logits, short(old).logits)
        assert not torch.allclose(long_(batch).logits, long_(old).logits)


# --------------------------------------------------------------------------- AdaF2M2


def test_adaf2m2_eval_is_the_unmasked_main_path(spec, batch):
    m = build("adaf2m2:dlf", spec).eval()
    with torch.no_grad():
        out = m(batch)
        emb = m.base.embed(batch)
        w = m.field_weights(batch, emb)
        ref = m.base.interact(emb.with_fields(emb.fields * w[:, :-1].unsqueeze(-1), emb.seq * w[:, -1:, None])).logits
    assert torch.allclose(out.logits, ref) and not out.aux_logits
    assert ((w > 0) & (w < 1)).all()


def test_adaf2m2_aux_copies_line_up_with_their_samples(spec):
    batch = make_batch(spec, B=6, seed=4)
    m = build("adaf2m2:dcnv2", spec)
    m.base.embedding.id_dropout = 0.0  # the same embeddings inside and outside the forward
    m.cfg.beta = m.cfg.gamma = 0.0  # nothing masked: every copy equals its own sample
    emb = m.base.embed(batch)
    copies, drop = m.masked_copies(emb)
    assert not drop.any()
    k = m.cfg.k
    for b in range(6):
        for j in range(k):
            assert torch.equal(copies.fields[b * k + j], emb.fields[b])
            assert torch.equal(copies.seq[b * k + j], emb.seq[b])
    out = m.train()(batch)
    plain = m.base.interact(emb).logits.detach()  # no adapter on the aux path
    for j in range(k):
        assert torch.allclose(out.aux_logits["feature_mask"][:, j], plain, atol=1e-5)
    # the loss pairs copy j of sample b with labels[b], summed over the k copies (eq. 5)
    y = batch["label"]
    want = k * torch.nn.functional.binary_cross_entropy_with_logits(plain, y)
    assert torch.allclose(loss_terms(out, y)["feature_mask"], want, atol=1e-5)


def test_adaf2m2_masks_with_per_field_mask_embeddings(spec, batch):
    m = build("adaf2m2:dcnv2", spec)
    m.cfg.beta = m.cfg.gamma = 1.0  # everything masked
    copies, drop = m.masked_copies(m.base.embed(batch))
    assert drop.all()
    assert torch.equal(copies.fields, m.mask_embedding.expand_as(copies.fields))


def test_adaf2m2_adapter_gets_no_gradient_from_the_aux_path(spec, batch):
    m = build("adaf2m2:dlf", spec)
    out = m(batch)
    loss_terms(out, batch["label"])["feature_mask"].backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in m.adapter.parameters())
    assert m.mask_embedding.grad is not None and m.mask_embedding.grad.abs().sum() > 0


def test_adaf2m2_wraps_a_base_model(spec):
    m = build("adaf2m2:dcnv2", spec)
    assert isinstance(m, AdaF2M2)
    assert m.loss_weights() == {"feature_mask": 0.2}


# --------------------------------------------------------------------------- config and losses


def test_unknown_model_config_key_is_an_error(spec):
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['topk'\]"):
        build_model("cdnet", spec, {"topk": 0.3})
    with pytest.raises(ValueError, match="topk_ratio: expected float"):
        build_model("cdnet", spec, {"topk_ratio": "high"})
    with pytest.raises(ValueError, match="unknown model 'deepfm'"):
        build_model("deepfm", spec)
    with pytest.raises(ValueError, match="topk_ratio must be in"):
        build_model("cdnet", spec, {"topk_ratio": 0.0})


def test_aux_term_without_weight_is_an_error(spec, batch):
    m = build("adaf2m2:dcnv2", spec)
    with pytest.raises(KeyError, match="feature_mask"):
        total_loss(loss_terms(m(batch), batch["label"]), {})


def test_cdnet_cost_is_independent_of_sequence_length():
    """Core slots: ceil(ratio · the batch's longest history), whatever L the batch is padded to."""
    from models.spec import FeatureSpec

    for L in (50, 400):
        spec = FeatureSpec.tiny(seq_len=L)
        m = CDNet(spec, CDNetConfig.tiny())
        m.cfg.topk_ratio = 0.05
        b = make_batch(spec, B=2, lens=[0, L])
        assert m.tokens(m.embed(b))[0].shape[1] == -(-L * 5 // 100) + 1 + spec.num_fields
        b = make_batch(spec, B=2, lens=[0, 30])
        assert m.tokens(m.embed(b))[0].shape[1] == -(-30 * 5 // 100) + 1 + spec.num_fields


@pytest.mark.parametrize("train", [False, True])
def test_cdnet_reads_only_the_left_padding_no_row_needs(train):
    """A served request pads every candidate's history to the model's L (200 on the small world, where a
    user has a few clicks): CDNet cuts the leading positions that are padding in every row, so its
    similarity, histogram and core slots cover the batch's longest history only. The logits (and in
    training the gradients) are those of the batch at its full padding."""
    from models.layers import trim_history

    spec = FeatureSpec.tiny(seq_len=40)
    torch.manual_seed(0)
    m = CDNet(spec, CDNetConfig.tiny()).train(train)
    b = make_batch(spec, B=6, lens=[0, 3, 7, 1, 7, 5])
    cut = trim_history(b)
    assert cut["hist_item_idx"].shape == (6, 7) and torch.equal(cut["hist_item_idx"], b["hist_item_idx"][:, -7:])
    assert m.embed(b).seq.shape[1] == 7
    torch.manual_seed(1)
    got = m(b).logits
    torch.manual_seed(1)
    want = m.interact(m.embedding(b)).logits  # the same model on the untrimmed batch
    assert torch.allclose(got, want, atol=1e-5)
    if train:
        params = [p for p in m.parameters() if p.requires_grad]
        g1 = torch.autograd.grad(got.sum(), params, allow_unused=True)
        g2 = torch.autograd.grad(want.sum(), params, allow_unused=True)
        for a, c in zip(g1, g2, strict=True):
            assert (a is None and c is None) or torch.allclose(a, c, atol=1e-5)


def test_dlf_rejects_indivisible_heads(spec):
    with pytest.raises(ValueError, match="divisible"):
        DLF(spec, DLFConfig(embed_dim=10, heads=3))


def test_masked_mean_is_the_mean_over_valid_positions_and_zero_without_any():
    from models.layers import masked_mean

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, 6, generator=g, requires_grad=True)
    mask = torch.rand(5, 7, generator=g) > 0.4
    mask[0] = False
    got = masked_mean(x, mask)
    for b in range(1, 5):
        assert torch.allclose(got[b], x[b][mask[b]].mean(0), atol=1e-6)
    assert torch.equal(got[0], torch.zeros(6))
    got.sum().backward()
    assert torch.equal(x.grad[~mask], torch.zeros_like(x.grad[~mask]))  # padding gets no gradient


@pytest.mark.parametrize("train", [False, True])
def test_transformer_attention_equals_the_multihead_attention_module(train):
    """`TransformerBlock.attend` (one fused SDPA call) = nn.MultiheadAttention with the same weights
    and key padding, values and gradients, at inference and in training (dropout 0)."""
    from models.layers import TransformerBlock

    torch.manual_seed(0)
    blk = TransformerBlock(16, 2, n_types=3).train(train)
    h = torch.randn(6, 9, 16, requires_grad=True)
    pad = torch.rand(6, 9) < 0.3
    pad[:, 0] = False  # every row attends to something
    ctx = torch.enable_grad() if train else torch.inference_mode()
    with ctx:
        got = blk.attend(h if train else h.detach(), pad)
        want = blk.attn(h if train else h.detach(), h if train else h.detach(), h if train else h.detach(),
                        key_padding_mask=pad, need_weights=False)[0]
    assert torch.allclose(got, want, atol=1e-5)
    if train:
        g1 = torch.autograd.grad(got.square().sum(), [h, blk.attn.in_proj_weight])
        g2 = torch.autograd.grad(want.square().sum(), [h, blk.attn.in_proj_weight])
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g1, g2, strict=True))


def test_core_behaviors_without_a_backward_pass_give_the_forward_values_of_the_ste_path():
    """Serving skips the straight-through products; the values must be those of the training path."""
    from models.cdnet import core_behaviors

    g = torch.Generator().manual_seed(0)
    seq = torch.randn(7, 12, 6, generator=g)
    mask = torch.arange(12)[None, :] >= torch.tensor([12, 10, 6, 0, 11, 3, 9])[:, None]  # left padding, short rows
    sim = (torch.rand(7, 12, generator=g) * 2 - 1) * mask
    with torch.no_grad():
        fast, sel_fast = core_behaviors(seq, mask, sim, 0.3, 0.5)
    slow, sel_slow = core_behaviors(seq.clone().requires_grad_(True), mask, sim, 0.3, 0.5)
    assert torch.equal(sel_fast, sel_slow) and torch.allclose(fast, slow.detach(), atol=1e-6)  # ste = hard + soft − sg(soft): hard up to rounding


def test_dcnv2_pools_behaviors_at_lookup_with_the_masked_mean_s_values(spec, batch):
    """DCNv2's mean slot sums each behavior field inside one embedding_bag (no (B, L, Db) tensor):
    the same logits and gradients as the masked mean over the whole behavior tensor."""
    from models.layers import masked_mean

    m = build("dcnv2", spec).train()
    emb = m.embedding(batch, pooled_only=True)
    assert emb.seq is None and emb.pooled is not None
    full = m.embed(batch)
    assert full.seq is not None and torch.allclose(emb.pooled, masked_mean(full.seq, full.seq_mask), atol=1e-6)
    torch.manual_seed(1)
    fast = m(batch).logits
    torch.manual_seed(1)
    slow = m.interact(m.embed(batch)).logits  # the masked-mean path
    assert torch.allclose(fast, slow, atol=1e-6)
    g_fast = torch.autograd.grad(fast.sum(), m.embedding.tables["item_idx"].weight)[0]
    g_slow = torch.autograd.grad(slow.sum(), m.embedding.tables["item_idx"].weight)[0]
    assert torch.allclose(g_fast, g_slow, atol=1e-6)


@pytest.mark.parametrize("normalize", ["softmax", "none"])
def test_target_attention_equals_the_mlp_over_the_concatenated_activation_unit(normalize):
    """DIN's activation unit is MLP([q, k, q−k, q⊙k]); `TargetAttention` computes its first layer
    without the (B, L, 4E) concat. Values and gradients (q, keys, every weight) must be those of the
    written-out form, on rows with padding and one with no behavior."""
    from models.layers import TargetAttention

    torch.manual_seed(0)
    att = TargetAttention(6, [8, 4], normalize)
    q = torch.randn(5, 6, requires_grad=True)
    keys = torch.randn(5, 7, 6, requires_grad=True)
    mask = torch.arange(7)[None, :] >= torch.tensor([0, 2, 5, 7, 3])[:, None]

    def reference():
        qq = q.unsqueeze(1).expand_as(keys)
        s = att.score(torch.cat([qq, keys, qq - keys, qq * keys], -1)).squeeze(-1)
        if normalize == "none":
            a = s * mask.float()
        else:
            a = torch.softmax(s.masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0)
        return torch.einsum("bl,ble->be", a, keys)

    params = [q, keys, *att.parameters()]
    got, want = att(q, keys, mask), reference()
    assert torch.allclose(got, want, atol=1e-6)
    g_got = torch.autograd.grad(got.square().sum(), params)
    g_want = torch.autograd.grad(want.square().sum(), params)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g_got, g_want, strict=True))
