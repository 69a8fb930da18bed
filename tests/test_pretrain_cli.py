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
