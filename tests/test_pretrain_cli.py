"""``fedpath pretrain`` end to end on the real public slide: tiles the server's slides, MIM, θ_pre on disk."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from fedcore.summary import read_summary
from fedpath.cli import run
from pipeline.checkpoint import load_model

REPO = Path(__file__).resolve().parents[1]


def _config(tmp_path: Path, manifest: Path | None) -> Path:
    cfg = {
        "run_dir": str(tmp_path / "run"),
        "tiling": {"target_mpp": 1.0, "tile_size": 64, "overlap": 0},
        "model": {"name": "unet", "channels": [8, 16, 32], "strides": [2, 2], "groups": 4},
        "pretrain": {"steps": 30, "batch_size": 8},
        "federation": {"server_manifest": None if manifest is None else str(manifest)},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_pretrain_writes_theta_pre_and_resumes(tmp_path: Path, data_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = (REPO / "data_manifests" / "slides.csv").read_text().splitlines()
    manifest = tmp_path / "server.csv"
    manifest.write_text("\n".join([rows[0], *[r for r in rows[1:] if "CMU-1" in r]]) + "\n")
    cfg = _config(tmp_path, manifest)
    args = ["pretrain", "--config", str(cfg), "--data-root", str(data_root)]
    assert run(args) == 0
    out = tmp_path / "run" / "server" / "pretrained.safetensors"
    net, meta = load_model(out)
    assert meta.source == "pretrained" and meta.model.out_channels == 2
    s = read_summary(tmp_path / "run")["pretrain"]
    assert s["tiles"] > 50 and s["steps"] == 30 and s["masked_l1_last"] < s["masked_l1_first"]
    mtime = out.stat().st_mtime_ns
    assert run(args) == 0  # same settings: kept, not retrained
    assert out.stat().st_mtime_ns == mtime
    assert "θ_pre" in capsys.readouterr().out


def test_pretrain_without_a_manifest_is_one_line(tmp_path: Path, data_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["pretrain", "--config", str(_config(tmp_path, None)), "--data-root", str(data_root)]) == 2
    cap = capsys.readouterr()
    err = (cap.out + cap.err).strip().splitlines()
    assert len(err) == 1 and "federation.server_manifest" in err[0]


def test_initial_model_is_theta_pre_and_must_fit_the_network(tmp_path: Path, data_root: Path) -> None:
    from federation.server import initial_model_state
    from pipeline.checkpoint import read_model_file
    from pipeline.config import load_config
    from pipeline.errors import FedpathError

    rows = (REPO / "data_manifests" / "slides.csv").read_text().splitlines()
    manifest = tmp_path / "server.csv"
    manifest.write_text("\n".join([rows[0], *[r for r in rows[1:] if "CMU-1" in r]]) + "\n")
    cfg_path = _config(tmp_path, manifest)
    assert run(["pretrain", "--config", str(cfg_path), "--data-root", str(data_root), "--set", "pretrain.steps=5"]) == 0
    pre = tmp_path / "run" / "server" / "pretrained.safetensors"
    cfg = load_config(cfg_path, ["federation.initial_model=" + str(pre)])
    state = initial_model_state(cfg)
    saved, _ = read_model_file(pre)
    assert all(torch.equal(state[k], saved[k]) for k in saved)
    other = load_config(cfg_path, ["federation.initial_model=" + str(pre), "model.channels=[8,16,64]"])
    with pytest.raises(FedpathError, match="another network"):
        initial_model_state(other)


def test_synthetic_pretrain_learns_nuclei_without_any_site_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """objective: synthetic: the server synthesises labelled slides, tiles them and trains the network on
    them (no data root, no DP); θ_pre segments synthetic nuclei far better than the seeded init it started
    from, and a re-run with the same settings keeps it."""
    from federation.server import initial_model_state
    from pipeline.config import load_config
    from pipeline.data import TileDataset
    from pipeline.metrics import dice
    from pipeline.models import build_model, foreground_from_logits
    from wsi.manifest import read_manifest

    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "run_dir": str(tmp_path / "run"),
        "tiling": {"target_mpp": 0.5, "tile_size": 64, "overlap": 0, "min_tissue_fraction": 0.3, "mask_classes": 3},
        "model": {"name": "unet", "out_channels": 3, "channels": [8, 16, 32], "strides": [2, 2], "groups": 4},
        "train": {"batch_size": 8, "physical_batch_size": 8, "lr": 0.005, "val_every": 40, "threads": 2},
        "pretrain": {"objective": "synthetic", "synthetic": {"steps": 80, "synth": {
            "sites": ["a", "b"], "slides_per_site": 2, "val_slides": 1, "held_out_slides": 0,
            "width": 512, "height": 512, "tissue_fraction": 0.6, "workers": 1}}},
    }))  # fmt: skip
    args = ["pretrain", "--config", str(cfg_path)]
    assert run(args) == 0
    out = tmp_path / "run" / "server" / "synthetic_pretrained.safetensors"
    net, meta = load_model(out)
    assert meta.source == "pretrained" and meta.model.out_channels == 3
    assert not (tmp_path / "run" / "server" / "pretrained.safetensors").exists()  # the MIM θ_pre's place
    s = read_summary(tmp_path / "run")["pretrain"]
    assert s["objective"] == "synthetic" and s["steps"] == 80 and s["sites"] == ["a", "b"]
    assert "synthetic sites a, b" in capsys.readouterr().out

    # scored on a synthetic validation slide's tiles, against the seeded init it replaces
    cfg = load_config(cfg_path)
    server = tmp_path / "run" / "server"
    val = [r.slide_id for r in read_manifest(server / "synthetic" / "manifests" / "a.csv") if r.split == "val"]
    ds = TileDataset(server / "synthetic_run" / "sites" / "a" / "store.zarr", val, classes=3)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    truth = (torch.stack([ds[i][1] for i in range(len(ds))])[:, 0] > 0).numpy()
    fresh = build_model(cfg.model)
    fresh.load_state_dict(initial_model_state(cfg))
    with torch.no_grad():
        d_pre = dice((foreground_from_logits(net.eval()(x)) > 0.5).numpy(), truth)
        d_fresh = dice((foreground_from_logits(fresh.eval()(x)) > 0.5).numpy(), truth)
    assert len(val) == 1 and len(ds) > 10
    assert d_pre > 0.85 and d_pre > d_fresh + 0.5, (d_pre, d_fresh)

    mtime = out.stat().st_mtime_ns
    assert run(args) == 0  # same settings: kept, not retrained
    assert out.stat().st_mtime_ns == mtime
