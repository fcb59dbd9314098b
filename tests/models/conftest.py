import pytest
import torch

from models.spec import FeatureSpec

HIST_VOCAB = {"hist_item_idx": "item_idx", "hist_cat_idx": "cat_idx", "hist_brand_idx": "brand_idx"}


def make_batch(spec: FeatureSpec, B: int = 8, seed: int = 0, lens=None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch = {n: torch.randint(1, v, (B,), generator=g) for n, v in spec.categorical.items()}
    batch |= {n: torch.rand(B, generator=g) * 5 for n in spec.numeric}
    for f, v in HIST_VOCAB.items():
        batch[f] = torch.randint(1, spec.categorical[v], (B, spec.seq_len), generator=g)
    lens = torch.tensor(lens) if lens is not None else torch.randint(0, spec.seq_len + 1, (B,), generator=g)
    lens[0] = 0  # an empty history is always in the batch
    batch["hist_len"] = lens
    for f in HIST_VOCAB:  # left padding: zeros before the valid tail
        pos = torch.arange(spec.seq_len)[None, :]
        batch[f] = torch.where(pos >= spec.seq_len - lens[:, None], batch[f], 0)
    batch["label"] = (torch.rand(B, generator=g) < 0.5).float()
    return batch


@pytest.fixture
def spec() -> FeatureSpec:
    return FeatureSpec.tiny()


@pytest.fixture
def batch(spec) -> dict[str, torch.Tensor]:
    return make_batch(spec)
