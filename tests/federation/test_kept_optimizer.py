"""``train.site_optimizer: kept``: a plain site's round job starts from the Adam moments its previous round
ended with (private site state), and a fresh job (the default) does not."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipeline"))
from ptrain_utils import SITE, small_config, tile_monuseg  # noqa: E402

from fedcore.layout import RunLayout  # noqa: E402
from federation.payloads import FitConfig  # noqa: E402
from federation.site import PlainSite, final_optimizer  # noqa: E402
from federation.site_state import SiteState  # noqa: E402
from pipeline.models import build_model  # noqa: E402

pytestmark = pytest.mark.realdata


def _adam_steps(job_dir: Path) -> set[float]:
    got = final_optimizer(job_dir)
    assert got is not None, job_dir
    tensors, info = got
    steps = [float(v) for k, v in tensors.items() if k.endswith(".step")]
    steps += [float(v) for k, v in info["scalars"].items() if k.endswith(".step")]
    assert steps
    return set(steps)


@pytest.mark.parametrize("mode", ["kept", "fresh"])
def test_round_job_continues_the_sites_optimiser(mode: str, data_root: Path, tmp_path: Path) -> None:
    tile_monuseg(data_root, tmp_path, tile_size=64)
    cfg = small_config(tmp_path, max_steps=3, site_optimizer=mode)
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in build_model(cfg.model).state_dict().items()}
    layout = RunLayout(tmp_path).site(SITE)
    for r in (0, 1):
        res = PlainSite().train(cfg, SITE, r, state, FitConfig())
        assert res.steps == 3
        state = res.state
    # Adam's step count is part of its state: a kept optimiser counts both rounds' steps
    assert _adam_steps(layout.round(1)) == ({6.0} if mode == "kept" else {3.0})
    saved = SiteState(layout.state).load_optimizer_before(2)
    if mode == "kept":
        assert saved is not None and SiteState(layout.state).load_optimizer_before(1) is None
    else:
        assert saved is None and not SiteState(layout.state).optimizer_path.exists()
