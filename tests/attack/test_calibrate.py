"""`fedpath calibrate`, reduced: the ε grid's pipeline on real MoNuSeg tiles in about a minute.

The deliberately easy setting is the worst-case upper bound (one 32 px tile, one SGD step of fedpath's
trainer, masks known) against the configured UNet: there the undefended control must beat the prior (the
CI of SSIM − prior above 0) and DP-SGD at a tiny ε must not. LiRA runs with a few tiny models, to check the
pipeline's outputs, not its power. The full grid is `make calibrate` (configs/calibrate.yaml).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from fedpath.calibrate import load_calibrate, run_calibrate


@pytest.mark.realdata
@pytest.mark.filterwarnings("error")  # no library warning anywhere in the grid
def test_calibrate_easy_setting_control_beats_prior_and_tiny_epsilon_does_not(
    tmp_path: Path, data_root: Path
) -> None:
    torch.set_num_threads(1)
    exp = tmp_path / "exp.yaml"
    exp.write_text(
        yaml.safe_dump(
            {
                "name": "calib-ci",
                "run_dir": str(tmp_path / "run"),
                "train": {"batch_size": 4, "lr": 0.01, "threads": 1},
            }
        )
    )
    cal_path = tmp_path / "calibrate.yaml"
    cal_path.write_text(
        yaml.safe_dump(
            {
                "experiment": str(exp),
                "epsilons": [None, 0.05],
                "utility_floor": 0.0,
                "utility": "none",
                "attack": {
                    "tile_size": 32,
                    "tiles_per_image": 1,
                    "max_images": 12,
                    "public_images": 6,
                    "tuning_images": 0,
                    "attacks": ["inverting_gradients"],
                    "upper_bound_targets": 3,
                    "iterations": 100,
                    "restarts": 1,
                    "real_updates": False,
                },
                "lira": {
                    "n_models": 3,
                    "steps": 2,
                    "tile_size": 16,
                    "tiles_per_image": 4,
                    "images": 2,
                    "held_out_images": 1,
                    "overrides": {
                        "model.channels": [4, 8], "model.strides": [2], "model.groups": 2, "train.batch_size": 2,
                    },
                },
            }
        )
    )
    cal, cfg = load_calibrate(cal_path)
    result = run_calibrate(cal, cfg, data_root)
    rows = {r["tag"]: r for r in result["rows"]}
    assert set(rows) == {"nodp", "0.05"}
    control, tiny = rows["nodp"]["inversion"], rows["0.05"]["inversion"]
    assert control["status"] == "beats prior", control
    assert tiny["status"] != "beats prior", tiny
    assert rows["0.05"]["noise_multiplier"] > 10 and rows["0.05"]["delta"] is not None
    for r in rows.values():
        lira = r["lira"]
        assert 0 <= lira["auc"] <= 1 and lira["n_shadows"] == 2
        # a (model, tile) pair counts when the other models hold the tile both in and out of training
        assert 0 < lira["n_members"] + lira["n_nonmembers"] <= 3 * 8
        assert r["dice"] is not None and 0 <= r["dice"] <= 1  # the LiRA models' held-out Dice (utility: none)
    assert rows["0.05"]["lira"]["epsilon"] == pytest.approx(0.05, rel=0.05)
    rec = result["recommendation"]
    assert rec["epsilon"] == 0.05 and "held-out Dice" in rec["text"]
    saved = json.loads((cfg.run_dir / "calibrate" / "calibrate.json").read_text())
    assert saved["complete"] and saved["recommendation"] == rec
    # resumable: a second run reads every part back instead of recomputing it
    again = run_calibrate(cal, cfg, data_root)
    assert again["rows"] == result["rows"]
