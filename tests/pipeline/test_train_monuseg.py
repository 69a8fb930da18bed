"""Local DP training on real MoNuSeg tiles: it learns, and a killed job resumes without spending ε twice."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ptrain_utils import REPO, SITE, small_config, tile_monuseg

from pipeline.data import TileDataset, split_by_slide
from pipeline.models import build_model
from pipeline.privacy import PrivacyLedger, epsilon_of
from pipeline.train import evaluate_dataset, train_local


@pytest.fixture(scope="module")
def run_dir(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    rd = tmp_path_factory.mktemp("train_run")
    tile_monuseg(data_root, rd, tile_size=64)
    return rd


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_short_dp_run_improves_validation_dice(run_dir: Path, precision: str, tmp_path: Path) -> None:
    """DP on (ε = 8 over the run, PRV accountant): 24 steps of 16 tiles beat the untrained network, in
    float32 and under bf16 autocast (``train.precision``). Each run has its own copy of the tiled site, so
    its own privacy ledger."""
    shutil.copytree(run_dir, tmp_path / "run")
    run_dir = tmp_path / "run"
    cfg = small_config(run_dir, max_steps=24, privacy={"enabled": True, "target_epsilon": 8.0})
    cfg.train.precision = precision  # type: ignore[assignment]
    store = run_dir / "sites" / SITE / "store.zarr"
    split = split_by_slide(store, 0.2, 0)
    torch.manual_seed(cfg.train.seed)  # train_local seeds the same way before building its network
    before = evaluate_dataset(build_model(cfg.model), TileDataset(store, split.val))["dice"]
    res = train_local(cfg, [SITE], run_dir, job_id="learn", progress=False)
    assert res.steps == 24 and res.epsilon is not None and 7.5 < res.epsilon <= 8.0
    assert res.metrics["val_dice"] > before + 0.1, (before, res.metrics)
    assert res.metrics["precision"] == precision
    ledger = json.loads((run_dir / "sites" / SITE / "privacy.json").read_text())
    assert ledger["entries"][-1]["steps"] == 24 and ledger["epsilon"] == res.epsilon
    # 64 tiles per MoNuSeg image at 64 px: group privacy gives δ_slide = 64 e^{63 ε} δ >> 1, no guarantee
    assert ledger["epsilon_slide"] is None and ledger["delta_slide"] is None
    assert "no slide-level guarantee" in ledger["statement"]["slide"]["text"]
    assert ledger["budget"]["epsilon"] == 8.0 and ledger["budget"]["delta"] == res.delta
    assert ledger["private"] is True and "os.urandom" in ledger["noise_source"]
    assert (run_dir / "sites" / SITE / "train" / "progress.json").is_file()


_CHILD = """
import sys
from pathlib import Path
sys.path[:0] = [{repo!r}, {tests!r}]
from ptrain_utils import small_config, SITE
from pipeline.train import train_local
cfg = small_config(Path({run!r}), max_steps=10, checkpoint_every=2,
                   privacy={{"enabled": True, "noise_multiplier": 1.0, "target_epsilon": None, "budget_epsilon": "unlimited", "accountant": "rdp"}})
train_local(cfg, [SITE], Path({run!r}), job_id="killed", progress=False)
"""


def test_killed_job_resumes_without_spending_twice(run_dir: Path, tmp_path: Path) -> None:
    rd = tmp_path / "run"
    (rd / "sites" / SITE).mkdir(parents=True)
    os.symlink(run_dir / "sites" / SITE / "store.zarr", rd / "sites" / SITE / "store.zarr")
    code = _CHILD.format(repo=str(REPO), tests=str(Path(__file__).parent), run=str(rd))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.DEVNULL)
    progress = rd / "sites" / SITE / "train" / "progress.json"
    deadline = time.time() + 120
    while time.time() < deadline and child.poll() is None:
        if progress.is_file() and json.loads(progress.read_text())["step"] >= 4:
            break
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    killed_at = json.loads(progress.read_text())["step"]
    ledger_path = rd / "sites" / SITE / "privacy.json"
    spent_at_kill = PrivacyLedger.load(ledger_path, accountant="rdp").entry("killed").steps  # type: ignore[union-attr]
    assert 4 <= killed_at < 10 and spent_at_kill in (killed_at, killed_at + 2)

    cfg = small_config(
        rd,
        max_steps=10,
        checkpoint_every=2,
        privacy={"enabled": True, "noise_multiplier": 1.0, "target_epsilon": None, "budget_epsilon": "unlimited", "accountant": "rdp"},
    )
    res = train_local(cfg, [SITE], rd, job_id="killed", progress=False)
    assert res.resumed_from == killed_at and res.steps == 10
    entry = PrivacyLedger.load(ledger_path, accountant="rdp").entry("killed")
    assert entry is not None and entry.complete
    lost = spent_at_kill - killed_at  # only a kill between ledger and checkpoint writes loses steps (counted)
    assert entry.steps == 10 + lost
    assert res.epsilon == epsilon_of([(1.0, entry.sample_rate, 10 + lost)], entry.delta, "rdp")
    # re-running a finished job trains nothing and spends nothing
    again = train_local(cfg, [SITE], rd, job_id="killed", progress=False)
    assert again.epsilon == res.epsilon and torch.equal(
        next(iter(again.state.values())), next(iter(res.state.values()))
    )


def test_fedprox_term_pulls_towards_the_global_model(run_dir: Path, tmp_path: Path) -> None:
    """DP-SGD with the proximal gradient added after clipping/noise stays closer to w_global than without."""
    rd = tmp_path / "run"
    (rd / "sites" / SITE).mkdir(parents=True)
    os.symlink(run_dir / "sites" / SITE / "store.zarr", rd / "sites" / SITE / "store.zarr")
    privacy = {"enabled": True, "noise_multiplier": 0.5, "target_epsilon": None, "budget_epsilon": "unlimited", "accountant": "rdp"}
    cfg = small_config(rd, max_steps=6, privacy=privacy, augment={"hed_jitter": 0.0})
    torch.manual_seed(123)
    w_global = build_model(cfg.model).state_dict()

    def distance(mu: float) -> float:
        res = train_local(
            cfg,
            [SITE],
            rd,
            init_state=w_global,
            proximal_ref=w_global if mu else None,
            proximal_mu=mu,
            job_id=f"prox-{mu}",
            progress=False,
        )
        return sum(float((res.state[k] - w_global[k]).pow(2).sum()) for k in w_global) ** 0.5

    assert distance(20.0) < 0.7 * distance(0.0)


def test_weight_average_is_the_moving_average_of_the_iterates(run_dir: Path, tmp_path: Path) -> None:
    """``train.ema_decay``: the job's result is the exponential moving average of its weights after each
    step (torch's AveragedModel: the first step copied, then d·avg + (1 - d)·w), not its last weights.
    The raw iterates come from the same seeded job stopped after 1, 2 and 3 steps."""
    rd = tmp_path / "run"
    (rd / "sites" / SITE).mkdir(parents=True)
    os.symlink(run_dir / "sites" / SITE / "store.zarr", rd / "sites" / SITE / "store.zarr")
    iterates = []
    for k in (1, 2, 3):
        cfg = small_config(rd, max_steps=k, val_every=None, lr=1e-2, privacy={"enabled": False})
        iterates.append(train_local(cfg, [SITE], rd, job_id=f"raw{k}", progress=False).state)
    cfg = small_config(rd, max_steps=3, val_every=None, lr=1e-2, ema_decay=0.5, privacy={"enabled": False})
    got = train_local(cfg, [SITE], rd, job_id="ema", progress=False).state
    w1, w2, w3 = iterates
    moved = 0.0
    for name, v in got.items():
        want = 0.25 * w1[name] + 0.25 * w2[name] + 0.5 * w3[name]
        torch.testing.assert_close(v, want, rtol=1e-4, atol=1e-5)
        moved += float((v - w3[name]).abs().sum())
    assert moved > 1e-3  # not the last weights
    # the checkpoint holds the average as well: a re-run of the finished job returns it unchanged
    again = train_local(cfg, [SITE], rd, job_id="ema", progress=False).state
    assert all(torch.equal(again[k], got[k]) for k in got)
