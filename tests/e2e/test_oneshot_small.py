"""The issue-16 experiment, small: one left-out site, no DP, a tiny network, every row produced and scored."""

from __future__ import annotations

import math
from pathlib import Path

import yaml

from fedcore.summary import read_summary
from fedpath.cli import run

REPO = Path(__file__).resolve().parents[2]
SITES = ["monuseg_breast_gi", "monuseg_kidney_bladder", "monuseg_lung_prostate"]


def test_oneshot_rows_small(tmp_path: Path, data_root: Path) -> None:
    rows = (REPO / "data_manifests" / "slides.csv").read_text().splitlines()
    server = tmp_path / "server.csv"
    server.write_text("\n".join([rows[0], *[r for r in rows[1:] if "CMU-1" in r]]) + "\n")
    cfg = {
        "name": "oneshot-small",
        "run_dir": str(tmp_path / "run"),
        "sites": [{"name": s, "manifest": str(REPO / "data_manifests" / f"{s}.csv")} for s in SITES],
        "tiling": {"target_mpp": 1.0, "tile_size": 32, "overlap": 0},
        "model": {"name": "unet", "channels": [4, 8], "strides": [2], "num_res_units": 0, "groups": 2},
        "train": {"batch_size": 8, "physical_batch_size": 8, "max_steps": 2, "threads": 1, "privacy": {"enabled": False}},
        "federation": {"rounds": 2, "min_sites": 2, "parallel_sites": 2, "port": 0,
                       "server_manifest": str(server)},
        "pretrain": {"steps": 5, "batch_size": 8},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    argv = ["experiment-oneshot", "--config", str(path), "--data-root", str(data_root), "--folds", SITES[0], "--no-dp-only"]
    assert run(argv) == 0
    s = read_summary(tmp_path / "run")["oneshot"]
    methods = {k.split("|")[2] for k in s["rows"]}
    for m in ("fedavg", "fedavg θ_pre", "universal", "data vectors (sum)", "data vectors (mean)",
              "data vectors (sum) + restore", "data vectors random control (sum)", "centralised",
              "data vectors (tuned λ)", "data vectors (sum) + fine-tune at a site",
              f"local:{SITES[1]}", f"local:{SITES[2]}"):
        assert m in methods, m
    for r in s["rows"].values():
        d = r["score"]["left_out"]
        assert d is not None and 0.0 <= d <= 1.0 and set(r["score"]["sites"]) == set(SITES[1:])
    dv = s["rows"][f"{SITES[0]}|no DP|data vectors (sum)"]
    fa = s["rows"][f"{SITES[0]}|no DP|fedavg"]
    # one upload per site for the data vectors, one per round for FedAvg: counted on the wire
    assert dv["rounds"] == 1 and fa["rounds"] == 2
    assert math.isclose(fa["bytes"]["up"], 2 * dv["bytes"]["up"], rel_tol=0.05)
    assert f"{SITES[0]}|no DP" in s["goals"]
    # λ tuned on the server's labelled (synthetic) tiles: the chosen λ is the curve's best
    tuned = s["rows"][f"{SITES[0]}|no DP|data vectors (tuned λ)"]
    assert max(tuned["lam_curve"].values()) == tuned["lam_curve"][f"{tuned['lam']:.4g}"]
    # restoration at a designated site: its one extra upload, through the aggregator
    rest = s["rows"][f"{SITES[0]}|no DP|data vectors (sum) + fine-tune at a site"]
    assert rest["restore_site"] == SITES[1] and rest["rounds"] == 2
    assert math.isclose(rest["bytes"]["up"], dv["bytes"]["up"] * 3 / 2, rel_tol=0.05)  # 2 sites, one sends twice
    run_dir = tmp_path / "run"
    assert (run_dir / "oneshot.png").stat().st_size > 10_000 and "left-out" in (run_dir / "oneshot.html").read_text()
    assert run(argv) == 0  # resumes: every row kept
