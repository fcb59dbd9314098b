"""The one optimizer every Funnel fit builds (`training.step.make_optimizer`)."""

from __future__ import annotations

import torch


def test_make_optimizer_is_the_fused_adam_with_torch_adam_s_updates():
    """Fused Adam (one kernel over all parameters: 140 → 20 ms per step over DCNv2's 34M parameters on
    2 cores, benchmarks/RESULTS.md) with the same updates as torch.optim.Adam, weight decay included."""
    from training.step import make_optimizer

    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 3))
    b = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 3))
    b.load_state_dict(a.state_dict())
    fused = make_optimizer(a.parameters(), lr=1e-2, weight_decay=1e-3)
    plain = torch.optim.Adam(b.parameters(), lr=1e-2, weight_decay=1e-3)
    assert isinstance(fused, torch.optim.Adam) and fused.defaults["fused"] is True
    x = torch.randint(0, 50, (16,))
    for _ in range(5):
        for m, opt in ((a, fused), (b, plain)):
            opt.zero_grad(set_to_none=True)
            m(x).square().mean().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6)
    # its state loads into the plain Adam and back (checkpoints resume either way)
    plain.load_state_dict(fused.state_dict())
