"""A small ``fedpath demo`` end to end through the real CLI: every stage, the real aggregator process.

The full-size demo (configs/demo.yaml) is the ``slow`` variant; the default run shrinks slides, rounds and
attack iterations so CI exercises the whole chain in about a minute.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml


def _small_demo_config(repo_root: Path, tmp_path: Path, full: bool) -> Path:
    cfg = yaml.safe_load((repo_root / "configs" / "demo.yaml").read_text())
    run_dir = tmp_path / "demo"
    cfg["run_dir"] = str(run_dir)
    cfg["data_root"] = str(run_dir / "synthetic")
    cfg["sites"] = [
        {"name": s["name"], "manifest": str(run_dir / "synthetic" / "manifests" / f"{s['name']}.csv")}
        for s in cfg["sites"]
    ]
    if not full:
        cfg["synth"].update(width=768, height=768)
        cfg["train"].update(max_steps=3, batch_size=8, physical_batch_size=8)
        cfg["federation"].update(rounds=2)
        cfg["attack"].update(
            epsilons=[None, 8.0], n_targets=1, iterations=15, upper_bound_targets=1, real_iterations=4,
            attacks=["inverting_gradients", "dlg"], dlg_iterations=5,
        )
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run_demo(repo_root: Path, tmp_path: Path, full: bool) -> dict:
    cfg_path = _small_demo_config(repo_root, tmp_path, full)
    fedpath = Path(sys.executable).with_name("fedpath")
    proc = subprocess.run(
        [str(fedpath), "demo", "--config", str(cfg_path)], cwd=repo_root, capture_output=True, text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = tmp_path / "demo"
    summary = json.loads((run_dir / "summary.json").read_text())
    for stage in ("synth", "tile", "federation", "infer", "attack", "demo"):
        assert stage in summary, f"stage {stage} missing from summary.json"
    assert (run_dir / "report" / "index.html").is_file()
    assert "report:" in proc.stdout
    assert json.loads((run_dir / "privacy_statement.json").read_text()) == summary["privacy"]
    # the two warnings that said the guarantee did not hold are gone because they are untrue now
    logs = proc.stdout + proc.stderr + "".join(p.read_text() for p in run_dir.glob("sites/*/rounds/*/job.log"))
    assert "Secure RNG turned off" not in logs and "Optimal order is the" not in logs
    return summary


def _check(summary: dict, rounds: int, min_dice: float) -> None:
    head = summary["demo"]
    # one held-out slide per site, every one stitched and scored
    assert head["held_out_slides"] == 3
    assert head["held_out_dice"] is not None and head["held_out_dice"] > min_dice
    for site, e in head["epsilon"].items():
        assert 0 < e["tile"]["epsilon"] <= 8.0 + 0.05, (site, e)
        assert 0 < e["tile"]["delta"] < 1 and "per tile" in e["tile"]["text"]
        assert e["site"]["epsilon"] is None  # no update-level DP in the demo: no site-level guarantee
    statement = summary["privacy"]  # privacy_statement.json, as the run's summary carries it
    assert set(statement["sites"]) == {"a", "b", "c"}
    for st in statement["sites"].values():
        sample = st["mechanisms"][0]
        assert "os.urandom" in sample["noise_source"] and sample["budget"]["epsilon"] == 8.0
        assert sample["slide"]["epsilon"] is None  # group privacy over a slide's tiles: nothing at ε = 8
    slides = summary["infer"]["slides"]
    assert {s["slide_id"][0] for s in slides} == {"a", "b", "c"}
    for s in slides:
        out = Path(s["output"])
        assert (out / "mask.ome.tif").is_file() and (out / "mask.geojson").is_file()
    assert summary["attack"]["headline"]
    # the headline reads the attack against its prior, whichever way the control went
    assert head["attack_verdict"].startswith("prior ") and "undefended attack" in head["attack_verdict"]


def test_demo_small(repo_root: Path, tmp_path: Path) -> None:
    summary = _run_demo(repo_root, tmp_path, full=False)
    # 2 rounds x 3 DP steps cannot segment well; the pipeline must still produce a scored mask per slide
    _check(summary, rounds=2, min_dice=0.0)


@pytest.mark.slow
def test_demo_full(repo_root: Path, tmp_path: Path) -> None:
    summary = _run_demo(repo_root, tmp_path, full=True)
    _check(summary, rounds=3, min_dice=0.85)
