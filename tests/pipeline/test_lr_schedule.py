"""The cosine learning-rate schedule spans a federation's rounds (0..R-1) as one horizon."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ExperimentConfig
from pipeline.train import _lr_schedule


def _lrs(cfg: ExperimentConfig, round_index: int | None, steps: int) -> list[float]:
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=cfg.train.lr)
    set_lr = _lr_schedule(cfg, opt, steps, round_index)
    out = []
    for s in range(steps + 1):
        set_lr(s)
        out.append(opt.param_groups[0]["lr"])
    return out


def test_cosine_over_all_rounds() -> None:
    cfg = ExperimentConfig.model_validate(
        {"train": {"lr": 1e-3, "lr_min": 1e-5, "lr_schedule": "cosine"}, "federation": {"rounds": 3}}
    )
    per_round = [_lrs(cfg, r, 10) for r in range(3)]
    assert per_round[0][0] == pytest.approx(1e-3)
    assert per_round[2][-1] == pytest.approx(1e-5)
    flat = [lr for r in per_round for lr in r]
    assert all(a >= b for a, b in zip(flat, flat[1:], strict=False))  # never restarts between rounds
    assert per_round[1][0] == pytest.approx(per_round[0][-1])
    local = _lrs(cfg, None, 30)  # a local job: its own steps are the horizon
    assert local[0] == pytest.approx(1e-3) and local[-1] == pytest.approx(1e-5)
    const = ExperimentConfig.model_validate({"train": {"lr": 1e-3}})
    assert set(_lrs(const, 0, 5)) == {1e-3}


@pytest.mark.parametrize(("start", "stopped_at"), [(0, 400), (400, None)])
def test_early_stopping_counts_patience_only_after_its_start(
    monkeypatch: pytest.MonkeyPatch, start: int, stopped_at: int | None
) -> None:
    """Validation Dice that dips early (noisy, high-LR steps) and rises later: with ``early_stop_start``
    the early dips do not count towards patience, so the run goes on to its later, better model."""
    import pipeline.train as train

    dice = iter([0.80, 0.79, 0.79, 0.79, 0.79, 0.81, 0.80, 0.80])
    monkeypatch.setattr(train, "evaluate_dataset", lambda *a, **k: {"dice": next(dice)})
    net = torch.nn.Linear(2, 2)
    stopper = train._EarlyStopping(net, [], every=100, patience=3, max_tiles=None, precision="float32", start=start)
    stop = None
    for step in range(100, 900, 100):
        if stopper.check(step):
            stop = step
            break
    assert stop == stopped_at and stopper.stopped_at == stopped_at
    assert stopper.best_step == (100 if start == 0 else 600)
