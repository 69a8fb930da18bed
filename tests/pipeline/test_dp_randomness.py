"""The randomness DP rests on: a CSPRNG nobody can replay, with the right distributions, in every DP draw."""

from __future__ import annotations

import math
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from ptrain_utils import SITE, small_config, tile_monuseg
from scipy import stats

from pipeline.dprandom import SECURE_SOURCE, SecureRandom, SeededRandom
from pipeline.privacy import PrivacyLedger
from pipeline.train import train_local


def test_uniforms_and_gaussians_have_their_distributions() -> None:
    rng = SecureRandom()
    u = rng.uniform(200_000)
    assert u.dtype == torch.float64 and float(u.min()) > 0 and float(u.max()) < 1
    assert stats.kstest(u.numpy(), "uniform").pvalue > 1e-4
    z = rng.gaussian((300_000,), std=2.5).numpy()
    assert abs(z.mean()) < 5 * 2.5 / math.sqrt(z.size)
    assert z.std() == pytest.approx(2.5, rel=0.01)
    assert stats.kstest(z / 2.5, "norm").pvalue > 1e-4
    mask = rng.bernoulli(100_000, 0.03)
    assert mask.mean() == pytest.approx(0.03, abs=5 * math.sqrt(0.03 * 0.97 / 100_000))
    assert len(set(rng.subset(range(10), 4))) == 4


def test_two_secure_sources_never_agree_and_cannot_be_pickled() -> None:
    a, b = SecureRandom(), SecureRandom()
    assert not torch.equal(a.gaussian((64,), 1.0), b.gaussian((64,), 1.0))
    with pytest.raises(TypeError, match="never pickled"):
        pickle.dumps(a)
    # the debug source replays by design, and says it is not private
    s1, s2 = SeededRandom(7), SeededRandom(7)
    assert torch.equal(s1.gaussian((64,), 1.0), s2.gaussian((64,), 1.0))
    assert not s1.private and "NOT PRIVATE" in s1.source and SecureRandom().private


def test_noise_is_added_in_float64_and_rounded_once() -> None:
    x = torch.full((1000,), 1.0, dtype=torch.float32)
    y = SeededRandom(1).add_gaussian(x, 0.5)
    z = SeededRandom(1).gaussian((1000,), 0.5)
    assert y.dtype == torch.float32 and torch.equal(y, (x.double() + z).float())


@pytest.fixture(scope="module")
def run_dir(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    rd = tmp_path_factory.mktemp("noise_run")
    tile_monuseg(data_root, rd, tile_size=64)
    return rd


def test_same_seed_runs_differ_by_the_noise_scale_and_nothing_on_disk_replays_it(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One DP-SGD step (SGD, same config seed, same model init) twice: the weights differ, by exactly the
    noise DP-SGD promises (per coordinate lr·√2·σC/B, where the clipped gradients are negligible at this
    tiny C), and the key material of neither run is anywhere in the run directory."""
    sigma, clip, lr = 1.0, 1e-4, 0.5
    privacy = {
        "enabled": True,
        "target_epsilon": None,
        "noise_multiplier": sigma,
        "max_grad_norm": clip,
        "budget_epsilon": "unlimited",
        "accountant": "rdp",
    }
    drawn: list[bytes] = []
    real_urandom = os.urandom

    def spy(n: int) -> bytes:
        out = real_urandom(n)
        drawn.append(out)
        return out

    monkeypatch.setattr(os, "urandom", spy)
    states = []
    for k in range(2):
        rd = tmp_path / f"run{k}"
        (rd / "sites" / SITE).mkdir(parents=True)
        shutil.copytree(run_dir / "sites" / SITE / "store.zarr", rd / "sites" / SITE / "store.zarr")
        cfg = small_config(rd, max_steps=1, optimizer="sgd", lr=lr, privacy=privacy, augment={"hed_jitter": 0.0})
        res = train_local(cfg, [SITE], rd, job_id="noise", progress=False)
        states.append(res.state)
        ledger = PrivacyLedger.load(rd / "sites" / SITE / "privacy.json", accountant="rdp")
        assert ledger.noise_source == SECURE_SOURCE and ledger.private
    entry = ledger.entries[-1]
    batch = int(entry.n_units * entry.sample_rate)  # Opacus' expected batch size: the noise divisor
    diff = torch.cat([(states[0][k] - states[1][k]).flatten().double() for k in states[0]])
    expected = lr * math.sqrt(2) * sigma * clip / batch
    assert diff.std().item() == pytest.approx(expected, rel=0.05)
    # key material (32-byte keys, 16-byte counter blocks) never reaches the disk, raw or hex
    keys = [b for b in drawn if len(b) in (16, 32)]
    assert len(keys) >= 4
    for path in tmp_path.rglob("*"):
        if path.is_file() and "store.zarr" not in path.parts:
            blob = path.read_bytes()
            for key in keys:
                assert key not in blob and key.hex().encode() not in blob, path


def test_seeded_debug_noise_replays_and_marks_the_site_not_private(run_dir: Path, tmp_path: Path) -> None:
    privacy = {"enabled": True, "target_epsilon": 8.0, "reproducible_noise": True, "accountant": "rdp"}
    states = []
    for k in range(2):
        rd = tmp_path / f"dbg{k}"
        (rd / "sites" / SITE).mkdir(parents=True)
        os.symlink(run_dir / "sites" / SITE / "store.zarr", rd / "sites" / SITE / "store.zarr")
        cfg = small_config(rd, max_steps=2, privacy=privacy)
        states.append(train_local(cfg, [SITE], rd, job_id="dbg", progress=False).state)
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    st = PrivacyLedger.load(rd / "sites" / SITE / "privacy.json", accountant="rdp").statement()
    assert st["private"] is False and "NOT PRIVATE" in st["text"] and "NOT PRIVATE" in st["noise_source"]


def test_slide_unit_is_real_slide_level_dp(run_dir: Path, tmp_path: Path) -> None:
    """privacy.unit: slide samples slides and accounts over them; a cap above the physical batch is refused."""
    rd = tmp_path / "slide"
    (rd / "sites" / SITE).mkdir(parents=True)
    os.symlink(run_dir / "sites" / SITE / "store.zarr", rd / "sites" / SITE / "store.zarr")
    privacy = {"enabled": True, "target_epsilon": 8.0, "unit": "slide", "max_tiles_per_slide": 8}
    cfg = small_config(rd, max_steps=3, privacy=privacy)
    res = train_local(cfg, [SITE], rd, job_id="slide", progress=False)
    ledger = PrivacyLedger.load(rd / "sites" / SITE / "privacy.json", unit="slide")
    e = ledger.entries[-1]
    n_slides = res.extra["n_train_slides"]
    assert e.unit == "slide" and e.n_units == n_slides and e.steps == 3
    assert e.sample_rate == pytest.approx(min(1.0, max(1.0, 16 / 8) / n_slides))
    assert ledger.statement()["text"].endswith("per slide") and 0 < e.epsilon <= 8.0
    bad = small_config(tmp_path / "bad", max_steps=1, privacy=privacy | {"max_tiles_per_slide": 9})
    (tmp_path / "bad" / "sites" / SITE).mkdir(parents=True)
    os.symlink(run_dir / "sites" / SITE / "store.zarr", tmp_path / "bad" / "sites" / SITE / "store.zarr")
    from pipeline.errors import FedpathError

    with pytest.raises(FedpathError, match="max_tiles_per_slide=9 exceeds train.physical_batch_size=8"):
        train_local(bad, [SITE], tmp_path / "bad", job_id="slide", progress=False)


def test_poisson_coins_come_from_the_csprng() -> None:
    from pipeline.dpsgd import PoissonSampler, PoissonSlideSampler

    a = list(PoissonSampler(1000, 0.05, 20, SecureRandom()))
    b = list(PoissonSampler(1000, 0.05, 20, SecureRandom()))
    assert a != b and np.mean([len(x) for x in a + b]) == pytest.approx(50, rel=0.2)
    slides = [list(range(i * 10, i * 10 + 10)) for i in range(30)]
    s = PoissonSlideSampler(slides, 0.2, 4, 50, physical=8, rng=SecureRandom())
    batches = list(s.logical_batches())
    assert all(len(t) == 4 and len({v // 10 for v in t}) == 1 for b in batches for t in b)
    assert np.mean([len(b) for b in batches]) == pytest.approx(6, rel=0.35)
    for chunk in s:  # physical batches hold whole slides only
        assert len(chunk) <= 8 and all(sum(1 for v in chunk if v // 10 == sl) in (0, 4) for sl in range(30))
