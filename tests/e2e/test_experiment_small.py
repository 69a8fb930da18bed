"""``fedpath experiment`` end to end on small synthetic sites: every variant trains, is scored on every
site's held-out slides and lands in the table. The real-data run (configs/experiment_real.yaml) is in the
README; this checks the machinery, not the figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fedpath.experiment import _threads_for, run_experiment
from fedpath.experiment_fedmic import PERSONAL_KINDS
from fedpath.simulate import site_job_threads
from pipeline.config import ConfigError, load_config
from wsi.synth import run_synth


def test_experiment_small(repo_root: Path, tmp_path: Path) -> None:
    cfg_d = yaml.safe_load((repo_root / "configs" / "demo.yaml").read_text())
    run_dir = tmp_path / "exp"
    data = tmp_path / "synthetic"
    cfg_d.update(run_dir=str(run_dir), data_root=str(data), name="exp-small")
    cfg_d["sites"] = [{"name": s, "manifest": str(data / "manifests" / f"{s}.csv")} for s in ("a", "b")]
    cfg_d["synth"].update(sites=["a", "b"], width=768, height=768)
    cfg_d["train"].update(max_steps=2, batch_size=8, physical_batch_size=8, lr_schedule="cosine", val_every=1, patience=1)
    cfg_d["federation"].update(rounds=1, min_sites=2, parallel_sites=2)
    # the instance recipe: 3-class tiles and model, whole test images scored at full resolution, 2 seeds
    cfg_d["tiling"]["mask_classes"] = 3
    cfg_d["model"]["out_channels"] = 3
    cfg_d["experiment"] = {
        "seeds": [0, 1], "federated": ["fedavg"], "full_resolution": True,
        "variants": ["local", "centralised", "federated", "feddp"],  # FedMIC: its own test below
    }
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(cfg_d))
    cfg = load_config(tmp_path / "exp.yaml")
    run_synth(cfg.synth, data, run_dir=run_dir)

    out = run_experiment(cfg, data, epsilons=[8.0])
    rows = out["rows"]
    assert set(rows) == {"local:a", "local:b", "centralised", "fedavg", "feddp eps=8"}
    for name, row in rows.items():
        assert row["n_seeds"] == 2 and row["seeds"] == [0, 1]
        for site in ("a", "b"):
            d, sd = row["eval"][site]["dice"], row["eval"][site]["dice_sd"]
            assert 0.0 <= d <= 1.0 and sd is not None and sd >= 0, (name, site, d, sd)
            # whole held-out images, scored at their own resolution; synthetic masks are images, so no
            # instance ground truth and no AJI (never from merged blobs)
            for seed_run in (state_runs := json.loads((run_dir / "experiment.json").read_text())["runs"]).values():
                assert seed_run["eval"][site]["n_slides"] >= 1
                assert all(m["aji"] is None and m["shape"][0] > 0 for m in seed_run["eval"][site]["slides"].values())
    assert len(state_runs) == 2 * len(rows)
    assert (run_dir / "experiment.png").stat().st_size > 1000 and "<img" in (run_dir / "experiment.html").read_text()
    assert "Paired differences" in out["comparisons_markdown"] and "Per site" in out["comparisons_markdown"]
    # the DP variant spent at most its budget at every site; the clip-only one is recorded as unbounded
    for site, led in rows["feddp eps=8"]["ledger"].items():
        assert 0 < led["epsilon"] <= 8.05, (site, led)
        assert 0 < led["delta"] < 1 and led["unit"] == "tile" and "per tile" in led["text"]
    assert out["table_markdown"].count("\n") == 2 + len(rows) and "±" in out["table_markdown"]
    # a second call resumes: nothing is retrained, the table is the same
    state = json.loads((run_dir / "experiment.json").read_text())
    again = run_experiment(cfg, data, epsilons=[8.0])
    assert again["rows"] == state["rows"]
    # a setting of the DP rows only trains those rows again: every other record stays as it was, and the DP
    # rows' directories of the other setting are moved aside (kept, never trained on)
    run_experiment(load_config(tmp_path / "exp.yaml", ["experiment.dp_lr=0.0005"]), data, epsilons=[8.0])
    after = json.loads((run_dir / "experiment.json").read_text())["runs"]
    assert set(after) == set(state["runs"])
    for k, run in state["runs"].items():
        assert (after[k]["key"] != run["key"]) if "eps=" in k else (after[k] == run), k
    for seed in (0, 1):
        vdir = run_dir / "variants" / f"seed_{seed}"
        assert [p.name.split(".stale-")[0] for p in vdir.glob("*.stale-*")] == ["feddp_eps_8"]
        assert (vdir / "feddp_eps_8" / "row_key").read_text().strip() == after[f"feddp eps=8@{seed}"]["key"]


def test_experiment_starts_every_row_from_theta_pre(repo_root: Path, tmp_path: Path) -> None:
    """experiment.start: synthetic runs the server's pretraining on its synthetic slides once and starts every
    row from its θ_pre, the local and centralised baselines included: with a learning rate of 1e-7 every
    scored model is θ_pre to 1e-5, and FedMIC rows, which have no θ_pre, are refused in one line."""
    import torch

    from pipeline.checkpoint import read_model_file

    cfg_d = yaml.safe_load((repo_root / "configs" / "demo.yaml").read_text())
    run_dir, data = tmp_path / "exp", tmp_path / "synthetic"
    cfg_d.update(run_dir=str(run_dir), data_root=str(data), name="exp-pre")
    cfg_d["sites"] = [{"name": s, "manifest": str(data / "manifests" / f"{s}.csv")} for s in ("a", "b")]
    cfg_d["synth"].update(sites=["a", "b"], width=512, height=512)
    cfg_d["train"].update(max_steps=1, batch_size=8, physical_batch_size=8, lr=1e-7, val_every=1, patience=1)
    cfg_d["federation"].update(rounds=1, min_sites=2, parallel_sites=2)
    cfg_d["pretrain"] = {"synthetic": {"steps": 4, "synth": {
        "sites": ["p"], "slides_per_site": 2, "val_slides": 1, "held_out_slides": 0, "width": 512, "height": 512}}}
    # the centralised and the two local models train side by side in worker processes (experiment.parallel_local),
    # one thread each, the centralised one first
    cfg_d["train"]["threads"] = 2
    cfg_d["experiment"] = {"seeds": [0], "federated": ["fedavg"], "start": "synthetic", "parallel_local": 2,
                           "variants": ["local", "centralised", "federated"]}  # fmt: skip
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(cfg_d))
    cfg = load_config(tmp_path / "exp.yaml")
    run_synth(cfg.synth, data, run_dir=run_dir)

    out = run_experiment(cfg, data, epsilons=[8.0])
    assert set(out["rows"]) == {"local:a", "local:b", "centralised", "fedavg"}
    pre, _ = read_model_file(Path(out["pretrain"]["path"]))
    assert out["pretrain"]["sites"] == ["p"] and 1 <= out["pretrain"]["steps"] <= 4  # train:'s early stopping
    for row in ("local_a", "local_b", "centralised", "fedavg"):
        state, _ = read_model_file(run_dir / "variants" / "seed_0" / row / "model.safetensors")
        worst = max(float((state[k].float() - pre[k].float()).abs().max()) for k in pre)
        assert worst < 1e-5, (row, worst)
    fresh, _ = read_model_file(run_dir / "variants" / "seed_0" / "fedavg" / "server" / "global" / "round_0.safetensors")
    assert all(torch.equal(fresh[k], pre[k]) for k in pre)  # version 0 of the federation is θ_pre

    # the trainings that share the cores split train.threads between them: local models and site jobs
    assert _threads_for(cfg, 2).train.threads == 1 and site_job_threads(cfg) == 1
    assert _threads_for(load_config(tmp_path / "exp.yaml", ["train.threads=8"]), 3).train.threads == 2
    assert site_job_threads(load_config(tmp_path / "exp.yaml", ["train.threads=null"])) is None
    # FedMIC rows from θ_pre too: the shared student from θ_pre (version 0), each site's teacher from the same
    # pretraining of the teacher's own, wider architecture; at lr 1e-7 both are still their θ_pre
    from fedcore.layout import RunLayout
    from federation.fedmic_site import teacher_config
    from federation.site_state import SiteState
    from fedpath.experiment_fedmic import FEDMIC_STRATEGY

    mic = run_experiment(load_config(tmp_path / "exp.yaml", ["experiment.variants=[fedmic]"]), data, epsilons=[8.0])
    assert {"fedmic", "fedmic eps=8"} <= set(mic["rows"])
    tpre, tmeta = read_model_file(run_dir / "server" / "synthetic_teacher_pretrained.safetensors")
    assert tmeta.model == teacher_config(cfg.model, FEDMIC_STRATEGY["teacher_width"]) and tmeta.model != cfg.model
    for row in ("fedmic", "fedmic_eps_8"):
        student, _ = read_model_file(run_dir / "variants" / "seed_0" / row / "model.safetensors")
        assert max(float((student[k].float() - pre[k].float()).abs().max()) for k in pre) < 1e-5, row
        for site in ("a", "b"):
            personal = SiteState(RunLayout(run_dir / "variants" / "seed_0" / row).site(site).state).load_personal()
            assert personal is not None
            worst = max(float((personal[f"teacher.{k}"].float() - tpre[k].float()).abs().max()) for k in tpre)
            assert worst < 1e-5, (row, site, worst)


def test_experiment_fedmic_rows_small(repo_root: Path, tmp_path: Path) -> None:
    """FedMIC rows (issue 15): each site's personalised teacher on its own split beside FedAvg's global
    model, the student as a global model, bytes on the wire; at no DP and at ε = 8."""
    cfg_d = yaml.safe_load((repo_root / "configs" / "demo.yaml").read_text())
    run_dir = tmp_path / "exp"
    data = tmp_path / "synthetic"
    cfg_d.update(run_dir=str(run_dir), data_root=str(data), name="exp-fedmic")
    cfg_d["sites"] = [{"name": s, "manifest": str(data / "manifests" / f"{s}.csv")} for s in ("a", "b")]
    cfg_d["synth"].update(sites=["a", "b"], width=512, height=512)
    cfg_d["train"].update(max_steps=2, batch_size=8, physical_batch_size=8)
    cfg_d["federation"].update(rounds=2, min_sites=2, parallel_sites=2)
    # the DP rows' own step budget (experiment.dp_max_steps) holds for FedMIC's DP row as for FedDP's
    cfg_d["experiment"] = {"seeds": [0], "variants": ["fedmic"], "dp_max_steps": 1}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(cfg_d))
    cfg = load_config(tmp_path / "exp.yaml")
    run_synth(cfg.synth, data, run_dir=run_dir)
    out = run_experiment(cfg, data, epsilons=[8.0])
    rows = out["rows"]
    assert set(rows) == {"fedavg", "feddp eps=8", "fedmic", "fedmic eps=8"}
    runs = json.loads((run_dir / "experiment.json").read_text())["runs"]
    for name, baseline in (("fedmic", "fedavg"), ("fedmic eps=8", "feddp eps=8")):
        mic = runs[f"{name}@0"]["fedmic"]
        assert mic["baseline"] == baseline and set(mic["personalised"]) == {"a", "b"}
        assert set(mic["personal_models"]) == set(PERSONAL_KINDS)
        for own in [*mic["personal_models"].values(), mic["baseline_local"]]:
            assert set(own) == {"a", "b"} and all(0.0 <= v["dice"] <= 1.0 for v in own.values())
        for s, auto in mic["personal_models"]["auto"].items():  # each site's pick on its validation split
            assert auto["val_dice"][auto["chosen"]] == max(v for v in auto["val_dice"].values() if v is not None)
            assert auto["dice"] == mic["personal_models"][auto["chosen"]][s]["dice"]
        assert all(r > 1 for r in mic["up_ratio"].values()), mic["up_ratio"]
    assert all(0 < led["epsilon"] <= 8.05 for led in rows["fedmic eps=8"]["ledger"].values())
    from fedcore.layout import RunLayout

    for row, steps in (("fedmic", 2), ("fedavg", 2), ("fedmic_eps_8", 1), ("feddp_eps_8", 1)):
        for s in ("a", "b"):
            job = RunLayout(run_dir / "variants" / "seed_0" / row).site(s).train_json(1)
            assert json.loads(job.read_text())["steps"] == steps, (row, s)
    table = (run_dir / "experiment.md").read_text()
    assert "| fedmic eps=8 | a |" in table and "| fedmic | b |" in table

    # experiment.fedmic: a bad key fails at once, naming it; new settings retrain the FedMIC rows only
    bad = cfg.model_copy(update={"experiment": cfg.experiment.model_copy(update={"fedmic": {"kd_wieght": 0.25}})})
    with pytest.raises(ConfigError, match="experiment.fedmic: unknown key 'kd_wieght'"):
        run_experiment(bad, data, epsilons=[8.0])
    weak = cfg.model_copy(update={"experiment": cfg.experiment.model_copy(update={"fedmic": {"kd_weight": 0.25}})})
    again = json.loads(json.dumps(run_experiment(weak, data, epsilons=[8.0])["rows"]))
    runs2 = json.loads((run_dir / "experiment.json").read_text())["runs"]
    for name in ("fedavg", "feddp eps=8"):
        assert runs2[f"{name}@0"] == runs[f"{name}@0"]  # not retrained
    for name in ("fedmic", "fedmic eps=8"):
        assert runs[f"{name}@0"]["fedmic"]["strategy"].get("kd_weight", 1.0) == 1.0  # the default
        assert runs2[f"{name}@0"]["fedmic"]["strategy"]["kd_weight"] == 0.25
        vdir = run_dir / "variants" / "seed_0" / name.replace(" ", "_").replace("=", "_")
        frozen = yaml.safe_load((vdir / "simulate" / "config.yaml").read_text())
        assert frozen["federation"]["strategy"]["kd_weight"] == 0.25  # this run trained with the new settings
    assert set(again) == set(rows)

    # `personal` only picks among the personal models a row already scored: switching it retrains nothing
    other = {"kd_weight": 0.25, "personal": "teacher"}  # the default is teacher+student+local
    pick = cfg.model_copy(update={"experiment": cfg.experiment.model_copy(update={"fedmic": other})})
    bodies = [
        RunLayout(run_dir / "variants" / "seed_0" / row).site(s).update(r)
        for row in ("fedmic", "fedmic_eps_8") for s in ("a", "b") for r in (0, 1)
    ]  # fmt: skip
    stamps = {p: p.stat().st_mtime_ns for p in bodies}
    run_experiment(pick, data, epsilons=[8.0])
    runs3 = json.loads((run_dir / "experiment.json").read_text())["runs"]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing trained again
    for name in ("fedmic", "fedmic eps=8"):
        mic3, mic2 = runs3[f"{name}@0"]["fedmic"], runs2[f"{name}@0"]["fedmic"]
        assert mic3["strategy"]["personal"] == "teacher" and mic2["strategy"]["personal"] == "teacher+student+local"
        assert mic3["personalised"] == mic2["personal_models"]["teacher"] != mic2["personalised"]
        assert runs3[f"{name}@0"]["seconds"] == runs2[f"{name}@0"]["seconds"]


def test_fedmic_table_pairs_personalised_with_fedavg_by_seed() -> None:
    """The FedMIC table pairs each seed's personalised model with FedAvg's global model of the same seed
    and privacy level on the same site, and gives mean ± sd over seeds."""
    from fedpath.experiment_fedmic import fedmic_table

    def mic(seed: int, pers: float) -> dict:
        b = {"a": {"up_per_round": 100 * 1024.0, "down_per_round": 200 * 1024.0}}
        both = {"teacher": {"a": {"dice": pers}}, "teacher+student": {"a": {"dice": pers + 0.01}},
                "auto": {"a": {"dice": pers + 0.01, "chosen": "teacher+student"}}}  # fmt: skip
        return {"name": "fedmic", "seed": seed, "eval": {"a": {"dice": 0.5}}, "fedmic": {
            "baseline": "fedavg", "strategy": {"personal": "teacher"}, "personalised": both["teacher"],
            "personal_models": both, "bytes": b,
            "up_ratio": {"a": 8.0}, "down_ratio": {"a": 4.0}}}  # fmt: skip

    runs = {
        "fedmic@0": mic(0, 0.80), "fedmic@1": mic(1, 0.70),
        "fedavg@0": {"name": "fedavg", "seed": 0, "eval": {"a": {"dice": 0.78}}},
        "fedavg@1": {"name": "fedavg", "seed": 1, "eval": {"a": {"dice": 0.70}}},
    }  # fmt: skip
    row = next(line for line in fedmic_table(runs, ["a"]).splitlines() if line.startswith("| fedmic | a |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # personalised = teacher 0.75 ± 0.071, FedAvg 0.74 ± 0.057, paired Δ teacher (0.02, 0.00): 0.010 ± 0.014,
    # teacher+student and auto (which picked it on both seeds) 0.020 ± 0.014; kinds a row did not score (the
    # student alone, student+local, teacher+student+local), and FedAvg's own local adaptation: "-"
    assert cells[2:13] == [
        "2", "teacher (auto: teacher+student ×2)", "0.750 ± 0.071", "0.740 ± 0.057",
        "0.010 ± 0.014", "-", "0.020 ± 0.014", "-", "-", "0.020 ± 0.014", "-",
    ], cells  # fmt: skip
    assert cells[13] == "0.500 ± 0.000" and cells[14] == "100.0 ± 0.0" and cells[16] == "8.00 ± 0.00"


def test_concurrent_invocations_keep_each_others_new_records() -> None:
    """Per-seed invocations run at once: each one's save keeps its own new records and takes every other
    record from disk, not the stale copy it read at its start (which once overwrote another seed's
    re-recorded row)."""
    from fedpath.experiment import merge_runs

    runs = {"fedmic@0": {"v": "stale"}, "fedmic@1": {"v": "mine"}, "fedavg@0": {"v": "same"}}
    disk = {"fedmic@0": {"v": "re-recorded by seed 0"}, "fedmic@1": {"v": "stale"}, "fedmic@2": {"v": "new"}}
    merge_runs(runs, {"fedmic@1"}, disk)
    assert runs == {
        "fedmic@0": {"v": "re-recorded by seed 0"}, "fedmic@1": {"v": "mine"}, "fedavg@0": {"v": "same"},
        "fedmic@2": {"v": "new"},
    }  # fmt: skip


def test_resumed_fedmic_row_keeps_its_earlier_training_time(repo_root: Path) -> None:
    """A FedMIC federation found finished (or resumed) is re-scored with its earlier record's wall time
    added, when that record is of the same training; another training's record adds nothing."""
    from fedpath.experiment_fedmic import FEDMIC_STRATEGY, _earlier_seconds

    cfg = load_config(repo_root / "configs" / "demo.yaml")
    strat = dict(FEDMIC_STRATEGY)
    row = {"seconds": 2421.0, "fedmic": {"strategy": dict(strat, personal="teacher")}}  # scoring-only differs
    assert _earlier_seconds(cfg, row, strat, dp=True) == 2421.0
    other = {"seconds": 2421.0, "fedmic": {"strategy": dict(strat, dp_student_clip_share=0.5)}}
    assert _earlier_seconds(cfg, other, strat, dp=True) == 0.0
    assert _earlier_seconds(cfg, other, strat, dp=False) == 2421.0  # a DP-only setting, the row without DP
    assert _earlier_seconds(cfg, {}, strat, dp=True) == 0.0


def test_row_keys_hold_the_settings_each_row_reads(repo_root: Path, tmp_path: Path) -> None:
    """A recorded row is stale only when a setting it reads changed: a DP-only setting reruns the DP rows, a
    federation setting the federations, a training setting every row; how the cores are shared none. Records
    of the one-key version resume under their own key."""
    from fedpath.experiment import _legacy_config_key, claim_row_dir, current_runs, row_key

    cfg = load_config(repo_root / "configs" / "experiment_real.yaml")
    rows = ["local:gbm40_emory", "centralised", "fedavg", "feddp eps=8", "fedmic", "fedmic eps=8"]

    def stale(*overrides: str) -> set[str]:
        other = load_config(repo_root / "configs" / "experiment_real.yaml", list(overrides))
        return {r for r in rows if row_key(other, r) != row_key(cfg, r)}

    assert stale("experiment.dp_lr=0.001") == stale("train.privacy.max_grad_norm=0.5") == {"feddp eps=8", "fedmic eps=8"}
    assert stale("federation.proximal_mu=0.1") == {"fedavg", "feddp eps=8", "fedmic", "fedmic eps=8"}
    assert stale("train.lr=0.001") == stale("federation.rounds=3") == stale("inference.tta=none") == set(rows)
    assert stale("experiment.parallel_local=1", "federation.parallel_sites=4", "train.threads=1", "experiment.seeds=[7]") == set()

    legacy = {"config_key": _legacy_config_key(cfg), "runs": {"fedavg@0": {"name": "fedavg", "seed": 0}}}
    assert current_runs(cfg, legacy) == {"fedavg@0": {"name": "fedavg", "seed": 0, "key": row_key(cfg, "fedavg")}}
    assert current_runs(load_config(repo_root / "configs" / "experiment_real.yaml", ["train.lr=0.001"]), legacy) == {}

    vdir = tmp_path / "feddp_eps_8"
    claim_row_dir(vdir, "k1")
    (vdir / "progress.json").write_text("{}")
    claim_row_dir(vdir, "k1")  # the same row resumes in its directory
    assert (vdir / "progress.json").is_file()
    claim_row_dir(vdir, "k2")  # another setting's directory is moved aside, whole
    assert not (vdir / "progress.json").exists() and (vdir / "row_key").read_text().strip() == "k2"
    (aside,) = tmp_path.glob("feddp_eps_8.stale-k1-*")
    assert (aside / "progress.json").is_file()
