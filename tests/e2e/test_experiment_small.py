"""``fedpath experiment`` end to end on small synthetic sites: every variant trains, is scored on every
site's held-out slides and lands in the table. The real-data run (configs/experiment_real.yaml) is in the
README; this checks the machinery, not the figures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from fedpath.experiment import run_experiment
from pipeline.config import load_config
from wsi.synth import run_synth


def test_experiment_small(repo_root: Path, tmp_path: Path) -> None:
    cfg_d = yaml.safe_load((repo_root / "configs" / "demo.yaml").read_text())
    run_dir = tmp_path / "exp"
    data = tmp_path / "synthetic"
    cfg_d.update(run_dir=str(run_dir), data_root=str(data), name="exp-small")
    cfg_d["sites"] = [{"name": s, "manifest": str(data / "manifests" / f"{s}.csv")} for s in ("a", "b")]
    cfg_d["synth"].update(sites=["a", "b"], width=768, height=768)
    cfg_d["train"].update(max_steps=2, batch_size=8, physical_batch_size=8)
    cfg_d["federation"].update(rounds=1, min_sites=2, parallel_sites=2)
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(cfg_d))
    cfg = load_config(tmp_path / "exp.yaml")
    run_synth(cfg.synth, data, run_dir=run_dir)

    out = run_experiment(cfg, data, epsilons=[math.inf, 8.0])
    rows = out["rows"]
    assert set(rows) == {
        "local:a", "local:b", "centralised", "fedavg", "fedprox", "feddp eps=inf", "feddp eps=8", "fedmic", "fedmic eps=8"
    }
    for name, row in rows.items():
        for site in ("a", "b"):
            d = row["eval"][site]["dice"]
            assert 0.0 <= d <= 1.0, (name, site, d)
    # the DP variant spent at most its budget at every site; the clip-only one is recorded as unbounded
    for site, led in rows["feddp eps=8"]["ledger"].items():
        assert 0 < led["epsilon"] <= 8.05, (site, led)
        assert 0 < led["delta"] < 1 and led["unit"] == "tile" and "per tile" in led["text"]
    for led in rows["feddp eps=inf"]["ledger"].values():
        assert "no guarantee" in led["text"] or "no tile-level guarantee" in led["text"]
    # FedMIC (issue 15): each site's personalised teacher scored on its own split, fewer bytes on the wire
    for name, baseline in (("fedmic", "fedavg"), ("fedmic eps=8", "feddp eps=8")):
        mic = rows[name]["fedmic"]
        assert mic["baseline"] == baseline and set(mic["personalised"]) == {"a", "b"}
        assert all(0.0 <= v["dice"] <= 1.0 for v in mic["personalised"].values())
        assert all(r > 1 for r in mic["up_ratio"].values()), mic["up_ratio"]
    assert all(0 < led["epsilon"] <= 8.05 for led in rows["fedmic eps=8"]["ledger"].values())
    table = (run_dir / "experiment.md").read_text()
    main_table, fedmic_part = table.split("\nFedMIC", 1)
    assert main_table.count("\n") == 2 + len(rows)
    assert "| fedmic eps=8 | a |" in fedmic_part and "| fedmic | b |" in fedmic_part
    # a second call resumes: nothing is retrained, the table is the same
    state = json.loads((run_dir / "experiment.json").read_text())
    again = run_experiment(cfg, data, epsilons=[math.inf, 8.0])
    assert again["rows"] == state["rows"]
