"""The attack sweep and the report on a small real run: MoNuSeg tiles in a site store, a real DP ledger,
a stored update and global model, the sweep with tiny settings, then every report section."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fedcore.summary import read_summary
from federation.attack.common import segmentation_loss
from federation.attack.multistep import LocalTraining, local_update
from federation.attack.sweep import run_attack
from federation.attack.tiles import load_monuseg_tiles
from federation.wire import UPDATE_META_KEY
from pipeline.checkpoint import ModelMeta, save_model
from pipeline.config import ExperimentConfig
from pipeline.errors import FedpathError
from pipeline.privacy import PrivacyLedger
from pipeline.report import build_report
from wsi.store import SiteStore

TILE = 16
MODEL = {"channels": [8, 16], "strides": [2], "num_res_units": 1, "groups": 4}


def _small_run(tmp: Path, data_root: Path) -> ExperimentConfig:
    run = tmp / "run"
    cfg = ExperimentConfig.model_validate(
        {
            "name": "tiny",
            "run_dir": str(run),
            "sites": [{"name": "a", "manifest": str(tmp / "a.csv")}],
            "model": MODEL,
            "train": {"batch_size": 2, "max_steps": 2, "lr": 0.01, "optimizer": "sgd"},
            "federation": {"rounds": 1},
            "attack": {
                "epsilons": [None, 8.0],
                "tile_size": TILE,
                "max_images": 6,
                "tiles_per_image": 2,
                "public_images": 2,
                "tuning_images": 1,
                "tuning": [{"tv_weight": 0.3}],
                "iterations": 4,
                "update_iterations": 3,
                "restarts": 1,
                "dlg_iterations": 2,
                "n_targets": 1,
                "batch_size": 2,
                "local_steps": 2,
                "upper_bound_targets": 1,
                "attacks": ["multistep", "inverting_gradients", "dlg"],
                "real_iterations": 3,
                "real_max_images": 2,
            },
        }
    )
    # site a's store: real MoNuSeg tiles and masks, tiled as wsi.store lays them out
    tiles = load_monuseg_tiles(data_root, TILE, 0.5, per_image=2, max_images=3, seed=5)
    n = len(tiles)
    store = SiteStore.create(cfg.store_path("a"), site="a", target_mpp=0.5, tile_size=TILE, overlap=0)
    w = store.begin_slide("s1", n, TILE, True)
    imgs = (tiles.images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    w.write(
        slice(0, n),
        imgs,
        np.zeros((n, 4), np.int64),
        np.ones(n, np.float32),
        tiles.masks.numpy().astype(np.uint8),
    )
    store.commit_slide("s1", {"split": "train"})
    # the site's real DP ledger
    ledger = PrivacyLedger.load(cfg.site_dir("a") / "privacy.json", "a")
    ledger.record(
        job="round-0",
        round_index=0,
        sample_rate=0.5,
        noise_multiplier=1.2,
        max_grad_norm=1.0,
        steps=2,
        planned_steps=2,
        delta=1e-3,
        n_units=n,
        max_tiles_per_slide=n,
        complete=True,
    )
    ledger.save()
    # the aggregator's round-0 global model and the update site a uploaded (2 SGD steps on 2 tiles)
    from pipeline.models import build_model

    torch.manual_seed(0)
    net = build_model(cfg.model).eval()
    save_model(
        run / "server/global/round_0.safetensors",
        net.state_dict(),
        ModelMeta(cfg.model, TILE, 0.5, "global", 0),
    )
    upd = local_update(
        net,
        tiles.images[:2],
        tiles.masks[:2],
        segmentation_loss(),
        LocalTraining(steps=2, batch_size=2, lr=0.01),
    )
    meta = {"site": "a", "round": 0, "n_tiles": 2, "epsilon": ledger.epsilon}
    (run / "server/updates/0").mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in upd.items()},
        str(run / "server/updates/0/a.safetensors"),
        metadata={UPDATE_META_KEY: json.dumps(meta)},
    )
    (run / "config.json").write_text(cfg.model_dump_json(indent=2))
    return cfg


@pytest.mark.realdata
@pytest.mark.filterwarnings("error")  # the sweep prints no library warning (torch's "Full backward hook ...")
def test_sweep_and_report_on_a_small_real_run(tmp_path: Path, data_root: Path) -> None:
    cfg = _small_run(tmp_path, data_root)
    torch.set_num_threads(1)
    result = run_attack(cfg, data_root)
    run = cfg.run_dir

    # the sweep: every ε, the trainer-run round and the upper bounds, scored against the prior, the stored update
    assert [e["epsilon"] for e in result["results"]] == [None, 8.0]
    assert result["results"][0]["noise_multiplier"] == 0.0 and result["results"][1]["noise_multiplier"] > 0
    assert result["results"][1]["delta"] == result["dp_accounting"]["delta"] and result["results"][1]["unit"] == "tile"
    keys = {"fedavg_round_2steps_batch2", "inverting_gradients_batch1_upper_bound", "dlg_batch1_upper_bound"}
    for e in result["results"]:
        assert set(e["attacks"]) == keys
        for a in e["attacks"].values():
            s = a["summary"]
            assert -1 <= s["ssim"]["mean"] <= 1 and a["seconds_per_reconstruction"] > 0
            assert s["difference"]["ci_low"] <= s["difference"]["mean"] <= s["difference"]["ci_high"]
            assert a["status"] in ("beats prior", "below prior", "indistinguishable from prior")
            assert all(r["prior_ssim"] >= r["prior_mean_ssim"] for r in a["per_tile"])
        assert (run / e["grid"]).is_file()
    # the three image sets are disjoint and named; scored tiles come from the scored images only
    imgs = result["images"]
    assert not set(imgs["public"]) & set(imgs["scored"]) and not set(imgs["tuning"]) & set(imgs["scored"])
    assert all(t.split("#")[0] in imgs["scored"] for t in result["scored_tiles"])
    assert all(t.split("#")[0] in imgs["tuning"] for t in result["tuning"]["tiles"])
    assert len(result["tuning"]["candidates"]) == 2
    assert result["primary_attack"] == "fedavg_round_2steps_batch2"
    real = result["real_updates"]
    assert len(real) == 1 and real[0]["site"] == "a" and real[0]["local_steps_assumed"] == 2
    assert "mean_nearest_ssim" in real[0]
    assert (run / "attack/attack.json").is_file()
    assert read_summary(run)["attack"]["per_epsilon"][1]["epsilon"] == 8.0

    # the report: self-contained HTML with every section, and report.json
    html_path = build_report(run)
    html = html_path.read_text()
    for section in (
        "verdict",
        "threat-model",
        "ledger",
        "reconstructions",
        "curves",
        "utility",
        "membership",
        "real-updates",
        "configuration",
    ):
        assert f'id="{section}"' in html, section
    assert len(re.findall(r'src="data:image/png;base64,', html)) >= 2 + 1 + 1  # grids, curve, real update
    assert 'src="http' not in html and "<link" not in html  # nothing fetched from outside
    ledger = json.loads((run / "sites/a/privacy.json").read_text())
    assert f"{ledger['epsilon']:.3g}" in html and ledger["epsilon_slide"] is None
    # the privacy statement section: ε with δ and unit, the vacuous slide figure said in words
    assert 'id="privacy-statement"' in html and ledger["statement"]["text"] in html
    assert "no slide-level guarantee" in html and "who must be trusted" in html
    report = json.loads((run / "report/report.json").read_text())
    assert report["ledger"][0]["site"] == "a" and report["ledger"][0]["noise_multiplier"] == 1.2
    assert report["stored_updates"] == 1 and report["config"]["name"] == "tiny"
    assert "honest-but-curious" in report["threat_model"]
    # no figure from another model: without calibrate, utility and membership are "not measured"
    assert html.count("not measured") >= 2 and "δ = " in html

    # with calibrate's results (here: its real statistics on constructed LiRA scores) the report shows the
    # utility curve, the ROC on log axes, the per-ε table and the recommendation
    from federation.attack.lira import lira_scores, summarise_lira
    from fedpath.calibrate import recommend

    rng = np.random.default_rng(0)
    inmask = rng.random((8, 50)) < 0.5
    rows = []
    for eps, shift, dice in ((None, 2.0, 0.75), (8.0, 0.2, 0.72), (1.0, 0.0, 0.6)):
        lira = summarise_lira(*lira_scores(rng.normal(0, 1, (8, 50)) + shift * inmask, inmask))
        rows.append(
            {
                "tag": "nodp" if eps is None else f"{eps:g}", "epsilon": eps, "delta": None if eps is None else 3e-4,
                "unit": None if eps is None else "tile", "noise_multiplier": 0.0, "dice": dice,
                "inversion": {"status": "beats prior" if eps is None else "indistinguishable from prior"},
                "lira": {**lira, "n_shadows": 7},
            }
        )  # fmt: skip
    (run / "calibrate").mkdir()
    (run / "calibrate/calibrate.json").write_text(
        json.dumps({"rows": rows, "utility_floor": 0.7, "recommendation": recommend(rows, 0.7), "lira_what": "t"})
    )
    html = build_report(run).read_text()
    assert "Recommendation:</b> ε = 8 (δ = 0.0003, per tile)" in html
    assert len(re.findall(r'src="data:image/png;base64,', html)) >= 2 + 1 + 1 + 2  # + utility curve, ROC
    assert "not measured" not in html.split('id="utility"')[1].split('id="real-updates"')[0]


def test_report_refuses_a_run_without_ledgers_or_attack_results(tmp_path: Path) -> None:
    with pytest.raises(FedpathError, match="privacy.json"):
        build_report(tmp_path)
    ledger = PrivacyLedger.load(tmp_path / "sites/a/privacy.json", "a")
    ledger.record(
        job="j",
        round_index=None,
        sample_rate=0.1,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        steps=1,
        planned_steps=1,
        delta=1e-5,
        n_units=10,
        max_tiles_per_slide=1,
        complete=True,
    )
    ledger.save()
    with pytest.raises(FedpathError, match="attack.json"):
        build_report(tmp_path)
    with pytest.raises(FedpathError, match="not found"):
        build_report(tmp_path / "nope")


def test_attack_refuses_without_real_tiles(tmp_path: Path) -> None:
    cfg = ExperimentConfig.model_validate({"run_dir": str(tmp_path / "run")})
    with pytest.raises(FedpathError, match="monuseg-train"):
        run_attack(cfg, tmp_path)


@pytest.mark.realdata
@pytest.mark.filterwarnings("error")
def test_sweep_on_site_store_tiles_splits_by_slide(tmp_path: Path, data_root: Path) -> None:
    """Without MoNuSeg under the data root (the demo), the sweep attacks the run's site-store tiles; the
    public/scored split is by slide, and a round of fedpath's trainer on those tiles is inverted."""
    tiles = load_monuseg_tiles(data_root, TILE, 0.5, per_image=2, max_images=3, seed=1)
    cfg = ExperimentConfig.model_validate(
        {
            "run_dir": str(tmp_path / "run"),
            "sites": [{"name": "a", "manifest": str(tmp_path / "a.csv")}],
            "model": MODEL,
            "train": {"batch_size": 2, "lr": 0.01, "threads": 1},
            "attack": {
                "epsilons": [None], "tile_size": TILE, "public_images": 1, "tuning_images": 0,
                "update_iterations": 2, "iterations": 2, "restarts": 1, "n_targets": 1, "batch_size": 2,
                "local_steps": 2, "upper_bound_targets": 1, "attacks": ["multistep", "inverting_gradients"],
                "real_updates": False,
            },
        }
    )  # fmt: skip
    store = SiteStore.create(cfg.store_path("a"), site="a", target_mpp=0.5, tile_size=TILE, overlap=0)
    for k, name in enumerate(sorted(set(tiles.sources))):
        idx = [i for i, s in enumerate(tiles.sources) if s == name]
        w = store.begin_slide(f"s{k}", len(idx), TILE, True)
        imgs = (tiles.images[idx].permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        w.write(slice(0, len(idx)), imgs, np.zeros((len(idx), 4), np.int64), np.ones(len(idx), np.float32),
                tiles.masks[idx].numpy().astype(np.uint8))  # fmt: skip
        store.commit_slide(f"s{k}", {"split": "train"})
    result = run_attack(cfg, None)
    assert result["tile_source"] == "site stores"
    assert len(result["images"]["public"]) == 1 and len(result["images"]["scored"]) == 2
    assert all(s.startswith("a/s") for s in result["images"]["scored"])
    assert set(result["results"][0]["attacks"]) == {
        "fedavg_round_2steps_batch2", "inverting_gradients_batch1_upper_bound"
    }  # fmt: skip
