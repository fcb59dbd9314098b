"""The model configs: one dataclass of knobs per model, torch-free.

They live here, not beside each model, so that the typed `FunnelConfig` (configs/schema.py)
loads without importing torch: every Ray Data worker of the ingest unpickles a config, and
importing torch cost each worker about 1.5 s and 300 MB (benchmarks/RESULTS.md, "Ingest").
Each model file imports its config from here; what each knob means is documented in the model's
file, next to the equations that read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class AdaF2M2Config:
    k: int = 1
    beta: float = 0.1
    gamma: float = 0.5
    alpha: float = 0.2
    adapter_hidden: list[int] = field(default_factory=lambda: [64])

    def __post_init__(self):
        if not 0.0 <= self.beta <= self.gamma <= 1.0:
            raise ValueError(f"need 0 <= beta <= gamma <= 1, got beta={self.beta}, gamma={self.gamma}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")

    @classmethod
    def tiny(cls) -> AdaF2M2Config:
        return cls(k=2, adapter_hidden=[16])


@dataclass
class CDNetConfig:
    embed_dim: int = 16
    id_dropout: float = 0.2  # user/item id → OOV in training (models.layers.FieldEmbedding)
    sim_dim: int = 32
    topk_ratio: float = 0.1
    bins: int = 10
    layers: int = 2
    heads: int = 2
    ffn_mult: int = 2
    hidden: list[int] = field(default_factory=lambda: [256, 128])
    dropout: float = 0.0
    tau: float = 0.5  # temperature of the soft mask used by the STE backward, in units of the row's score std
    use_core: bool = True
    use_distribution: bool = True
    full_sequence: bool = False
    behavior_age: bool = False  # the behaviors' age on the core tokens (variant, see the module docstring)
    category_recency: bool = False  # a context token: the age of the latest behavior in the target's category

    def __post_init__(self):
        if not 0.0 < self.topk_ratio <= 1.0:
            raise ValueError(f"topk_ratio must be in (0, 1], got {self.topk_ratio}")
        if self.bins < 1:
            raise ValueError(f"bins must be >= 1, got {self.bins}")

    @classmethod
    def tiny(cls) -> CDNetConfig:
        return cls(embed_dim=8, sim_dim=8, topk_ratio=0.5, bins=4, layers=1, heads=2, hidden=[16])


@dataclass
class DCNv2Config:
    embed_dim: int = 16
    id_dropout: float = 0.2  # user/item id → OOV in training (models.layers.FieldEmbedding)
    cross_layers: int = 3
    cross_rank: int = 0  # 0 = full-rank W
    hidden: list[int] = field(default_factory=lambda: [256, 128])
    dropout: float = 0.0
    sequence: str = "mean"  # how the behaviors enter as one more field: "mean" | "din"

    @classmethod
    def tiny(cls) -> DCNv2Config:
        return cls(embed_dim=8, cross_layers=2, hidden=[32])


@dataclass
class DINConfig:
    embed_dim: int = 16
    id_dropout: float = 0.2  # user/item id → OOV in training (models.layers.FieldEmbedding)
    hidden: list[int] = field(default_factory=lambda: [256, 128])
    attention_hidden: list[int] = field(default_factory=lambda: [64, 32])
    dropout: float = 0.0
    sequence: str = "short"  # "short" (last short_len behaviors) | "long" (all L)
    attention_norm: str = "softmax"  # "softmax" | "none" (the DIN paper's unnormalised weights)

    @classmethod
    def tiny(cls) -> DINConfig:
        return cls(embed_dim=8, hidden=[32], attention_hidden=[16])


@dataclass
class DLFConfig:
    embed_dim: int = 16
    id_dropout: float = 0.2  # user/item id → OOV in training (models.layers.FieldEmbedding)
    layers: int = 3
    rank: int = 24
    n_low: int = 16
    n_high: int = 16
    n_implicit: int = 16
    block_hidden: list[int] = field(default_factory=lambda: [256])
    heads: int = 2
    hidden: list[int] = field(default_factory=lambda: [256, 128])
    dropout: float = 0.0
    gate_eps: float = 1e-3
    use_gate: bool = True
    use_rli: bool = True
    use_naf: bool = True
    post_norm: bool = False  # LayerNorm after the gated residual (not in eq. 9)
    head: str = "mlp"  # "mlp" | "linear" (eq. 16: one fully connected layer)

    def __post_init__(self):
        if self.head not in ("mlp", "linear"):
            raise ValueError(f"DLF head must be 'mlp' or 'linear', got {self.head!r}")

    @classmethod
    def tiny(cls) -> DLFConfig:
        return cls(embed_dim=8, layers=2, rank=4, n_low=4, n_high=4, n_implicit=4, block_hidden=[32], hidden=[16])


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
    lam_dec_ramp_steps: int = 50  # λ_dec rises linearly from 0 over these steps after the warm-up
    warmup_steps: int = 20  # stage (i): semantic warm-up only (each step decodes ~the whole catalogue's
    # titles: a batch's targets and hard negatives); 0 = joint training from the first step
    in_batch_negatives: bool = True
    logq: bool = True  # log-q correction of the in-batch negatives (needs item_logq in the batch)
    uniform_negatives: int = 32  # per row, uniform over the items released at the row's ts
    w_hard: float = 1.0  # weights of the three negative groups' mean pair losses
    w_in_batch: float = 1.0
    w_uniform: float = 1.0
    item_bias: bool = False  # variant: [e_i; b_i]·[u; 1]
    id_embedding: bool = False  # variant: + item-ID embedding (ID dropout below)
    id_dropout: float = 0.5

    def __post_init__(self):
        if self.text_encoder not in ("small", "features"):
            raise ValueError(f"text_encoder must be 'small' or 'features', got {self.text_encoder!r}")
        if self.lam_dec < 0:
            raise ValueError(f"lam_dec must be >= 0, got {self.lam_dec}")
        for name in ("w_hard", "w_in_batch", "w_uniform", "uniform_negatives", "warmup_steps", "lam_dec_ramp_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.id_dropout < 1:
            raise ValueError(f"id_dropout must be in [0, 1), got {self.id_dropout}")

    @classmethod
    def tiny(cls) -> KARMAConfig:
        return cls(dim=16, text_dim=16, decoder_hidden=32, decoder_layers=1, decoder_heads=2, decoder_kv_heads=1,
                   decoder_intermediate=32, warmup_steps=2, lam_dec_ramp_steps=2, uniform_negatives=8)


@dataclass
class LREAConfig:
    embed_dim: int = 16
    id_dropout: float = 0.2  # user/item id → OOV in training (models.layers.FieldEmbedding)
    rank: int = 64  # the paper's best range is 64–128 (32 its worst)
    attention_hidden: int = 64
    negative_slope: float = 0.01
    lam: float = 0.3  # λ of eq. 11
    hidden: list[int] = field(default_factory=lambda: [256, 128])
    dropout: float = 0.0

    @classmethod
    def tiny(cls) -> LREAConfig:
        return cls(embed_dim=8, rank=4, attention_hidden=8, hidden=[16])


@dataclass
class MeanPoolConfig:
    embed_dim: int = 16
    id_dropout: float = 0.2  # user/item id → OOV in training (models.layers.FieldEmbedding)
    hidden: list[int] = field(default_factory=lambda: [256, 128])
    dropout: float = 0.0
    use_long: bool = True

    @classmethod
    def tiny(cls) -> MeanPoolConfig:
        return cls(embed_dim=8, hidden=[32])


@dataclass
class SIMHardConfig:
    embed_dim: int = 16
    id_dropout: float = 0.2  # user/item id → OOV in training (models.layers.FieldEmbedding)
    k: int = 50
    hidden: list[int] = field(default_factory=lambda: [256, 128])
    attention_hidden: list[int] = field(default_factory=lambda: [64, 32])
    dropout: float = 0.0

    @classmethod
    def tiny(cls) -> SIMHardConfig:
        return cls(embed_dim=8, k=4, hidden=[16], attention_hidden=[8])


@dataclass
class TwoTowerConfig:
    embed_dim: int = 16
    dim: int = 64
    hidden: list[int] = field(default_factory=lambda: [256])
    temperature: float = 0.05
    logq: bool = True
    item_counters: bool = True  # the item tower reads the item's click counters (with them it can be a popularity model)
    adaf2m2: bool = False
    k: int = 2
    beta: float = 0.1
    gamma: float = 0.5
    alpha: float = 0.2
    adapter_hidden: list[int] = field(default_factory=lambda: [32])

    @classmethod
    def tiny(cls) -> TwoTowerConfig:
        return cls(embed_dim=8, dim=16, hidden=[32], adapter_hidden=[8])
