"""``fedpath pretrain`` end to end on the real public slide: tiles the server's slides, MIM, θ_pre on disk."""

from __future__ import annotations

from pathlib import Path

import pytest
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
        "pretrain": {"steps": 30, "batch_size": 8, "manifest": None if manifest is None else str(manifest)},
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
    assert len(err) == 1 and "pretrain.manifest" in err[0]
