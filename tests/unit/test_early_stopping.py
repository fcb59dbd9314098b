"""The one early-stopping rule both fit loops use (training.fit.EarlyStopping); no Ray."""

import torch

from training.fit import EarlyStopping


def _model(value: float) -> torch.nn.Linear:
    m = torch.nn.Linear(1, 1)
    with torch.no_grad():
        m.weight.fill_(value)
    return m


def test_stops_after_patience_epochs_without_a_new_best_and_keeps_the_best_weights():
    stop = EarlyStopping(patience=2, max_epochs=10)
    model = _model(0.0)
    stopped = []
    for epoch, auc in enumerate([0.70, 0.74, 0.73, 0.745, 0.74, 0.744, 0.80]):
        with torch.no_grad():
            model.weight.fill_(float(epoch))
        stopped.append(stop.update(auc, model))
        if stopped[-1]:
            break
    assert stopped == [False, False, False, False, False, True]  # two epochs after the best (0.745, epoch 3)
    assert stop.best_epoch == 3 and stop.best == 0.745 and stop.epoch == 6
    stop.restore_best(model)
    assert float(model.weight.detach()) == 3.0


def test_stops_at_max_epochs():
    stop = EarlyStopping(patience=5, max_epochs=3)
    m = _model(0.0)
    assert [stop.update(v, m) for v in (0.1, 0.2, 0.3)] == [False, False, True]


def test_state_round_trips_through_a_checkpoint(tmp_path):
    stop = EarlyStopping(patience=2, max_epochs=10)
    m = _model(1.5)
    stop.update(0.7, m)
    stop.update(0.6, m)
    torch.save({"early_stopping": stop.state_dict()}, tmp_path / "state.pt")
    saved = torch.load(tmp_path / "state.pt", weights_only=True)["early_stopping"]  # as the Ray Train loop loads it
    resumed = EarlyStopping(patience=2, max_epochs=10)
    resumed.load_state_dict(saved)
    assert (resumed.epoch, resumed.best, resumed.best_epoch, resumed.waited) == (2, 0.7, 0, 1)
    assert not resumed.done and resumed.update(0.65, m)  # the second epoch without a new best stops it
    other = _model(0.0)
    resumed.restore_best(other)
    assert float(other.weight.detach()) == 1.5
