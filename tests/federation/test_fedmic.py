"""FedMIC on real tiles: the site's private state survives SIGKILL without spending ε twice, and a
two-site federation runs end to end with low-rank uploads and compressed downloads."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from fedcore.layout import RunLayout
from pipeline.config import ExperimentConfig, load_config
from pipeline.errors import FedpathError
from pipeline.tiles import tile_sites
from wsi.manifest import subset_manifest

pytestmark = pytest.mark.realdata

SITES = {"monuseg_kidney_bladder": "monuseg_kidney_bladder.csv", "gbm40_emory": "gbm40.csv"}


def _config(tmp: Path, data_root: Path, repo_root: Path, run: str, **train: Any) -> Path:
    sites = []
    for name, manifest in SITES.items():
        m = subset_manifest(repo_root / "data_manifests" / manifest, tmp / manifest, {"train": 2, "val": 1})
        sites.append({"name": name, "manifest": str(m)})
    tr: dict[str, Any] = {
        "batch_size": 4,
        "physical_batch_size": 4,
        "max_steps": 2,
        "threads": 1,
        "privacy": {
            "enabled": True,
            "target_epsilon": None,
            "noise_multiplier": 1.0,
            "budget_epsilon": "unlimited",
            "max_grad_norm": 1.0,
        },
    }
    tr.update(train)
    data = {
        "name": "fedmic-realdata",
        "run_dir": str(tmp / run),
        "data_root": str(data_root),
        "sites": sites,
        "tiling": {"target_mpp": 1.0, "tile_size": 64, "min_tissue_fraction": 0.0},
        "model": {"name": "unet", "channels": [8, 16], "strides": [2], "num_res_units": 0, "groups": 4},
        "train": tr,
        "federation": {
            "strategy": {"name": "fedmic", "energy_start": 0.9, "energy_end": 0.98, "energy_rounds": 2},
            "rounds": 2,
            "min_sites": 2,
            "port": 0,
            "parallel_sites": 1,
            "upload_retries": 0,
            "simulate_workers": "cold",
        },
    }
    path = tmp / f"{run}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory, data_root: Path, repo_root: Path) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("fedmic")
    cfg = load_config(_config(tmp, data_root, repo_root, "template"))
    tile_sites(cfg, data_root, "test")
    return tmp, cfg.run_dir


def _fresh(stores: tuple[Path, Path], data_root: Path, repo_root: Path, run: str, **train: Any) -> ExperimentConfig:
    tmp, template = stores
    cfg = load_config(_config(tmp, data_root, repo_root, run, **train))
    for s in cfg.sites:
        shutil.copytree(template / "sites" / s.name / "store.zarr", cfg.store_path(s.name))
    return cfg


_JOB = """
import sys
from federation.fedmic_site import FedMICSite
from federation.server import initial_model_state
from federation.strategies import build_strategy
from pipeline.config import load_config
cfg = load_config(sys.argv[1])
s = build_strategy(cfg.federation, 2)
FedMICSite().train(cfg, sys.argv[2], 0, initial_model_state(cfg), s.configure_fit(0))
"""


def test_site_job_killed_between_steps_resumes_its_personal_state_and_spends_no_epsilon_twice(
    stores: tuple[Path, Path], data_root: Path, repo_root: Path
) -> None:
    from federation.fedmic_site import FedMICSite
    from federation.server import initial_model_state
    from federation.site_state import SiteState
    from federation.strategies import build_strategy

    cfg = _fresh(stores, data_root, repo_root, "kill", max_steps=6, checkpoint_every=1)
    site = next(iter(SITES))
    lay = RunLayout(cfg.run_dir).site(site)
    frozen = cfg.run_dir / "frozen.yaml"
    frozen.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = dict(os.environ, PYTHONPATH=str(repo_root))
    job = subprocess.Popen([sys.executable, "-c", _JOB, str(frozen), site], env=env, stderr=subprocess.PIPE)
    progress = lay.round(0) / "progress.json"
    end = time.monotonic() + 600
    while not (progress.is_file() and json.loads(progress.read_text())["step"] >= 2):
        assert job.poll() is None, job.stderr.read().decode()[-2000:] if job.stderr else ""
        assert time.monotonic() < end
        time.sleep(0.02)
    job.send_signal(signal.SIGKILL)  # between local steps: a checkpoint exists, the job is not done
    job.wait()
    killed_at = json.loads(progress.read_text())["step"]
    assert not json.loads(progress.read_text())["done"] and killed_at < 6
    ledger = json.loads(lay.privacy.read_text())
    spent_before = ledger["entries"][0]["steps"]
    assert killed_at <= spent_before < 6

    strategy = build_strategy(cfg.federation, 2)
    fit = strategy.configure_fit(0)
    result = FedMICSite().train(cfg, site, 0, initial_model_state(cfg), fit)
    assert result.resumed_from == killed_at >= 2  # teacher, student and optimiser from the checkpoint
    entries = json.loads(lay.privacy.read_text())["entries"]
    # ε spent once: the job's steps are counted once, plus at most the steps lost with the kill
    assert [e["job"] for e in entries] == ["round-0"]
    assert entries[0]["steps"] == 6 + (spent_before - killed_at) and entries[0]["complete"]
    state = SiteState(lay.state)
    assert state.personal_round() == 0 and state.load_optimizer() is not None
    personal = state.load_personal()
    assert personal is not None and any(k.startswith("teacher.") for k in personal)
    assert not any(k.startswith("student.") for k in personal)  # the shared model is not personal state
    assert set(result.state) == set(initial_model_state(cfg))  # only the student is returned (and sent)
    # the site's own student after its local steps is kept too (``personal: ...+local``): the iterate sent
    for k, v in result.state.items():
        assert torch.equal(personal[f"local.{k}"], v)
    _check_personal_kinds(cfg, site, personal, result.state)
    # a re-run of the finished job trains nothing and spends nothing
    again = FedMICSite().train(cfg, site, 0, initial_model_state(cfg), fit)
    assert json.loads(lay.privacy.read_text())["entries"] == entries
    for k in result.state:
        assert torch.equal(again.state[k], result.state[k])


def _check_personal_kinds(cfg: Any, site: str, personal: dict[str, torch.Tensor], local: dict[str, torch.Tensor]) -> None:
    """Every personal kind builds a network that loads its state; members are what their names say."""
    from federation.fedmic_site import FedMICSite
    from federation.site_state import SiteState
    from pipeline.models import build_model

    glob = {k: torch.full_like(v, 0.5) if v.is_floating_point() else v for k, v in local.items()}
    for kind, n in (("teacher", 1), ("teacher+student", 2), ("student+local", 2), ("teacher+student+local", 3)):
        strat = dict(cfg.federation.strategy, personal=kind, personal_select="last")
        kcfg = cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"strategy": strat})})
        got = FedMICSite().personal_model(kcfg, site, glob)
        assert got is not None
        state, net_cfg = got
        build_model(net_cfg).load_state_dict(state)  # strict: every tensor in place
        assert len(net_cfg.members) == (n if n > 1 else 0)
        if kind == "student+local":
            for k, v in local.items():
                assert torch.equal(state[f"members.0.{k}"], glob[k]) and torch.equal(state[f"members.1.{k}"], v)
    # personal: auto -- the site scores every candidate on its own validation tiles and keeps the best
    import json

    from fedcore.layout import RunLayout
    from federation.fedmic_site import AUTO_CANDIDATES

    strat = dict(cfg.federation.strategy, personal="auto", personal_select="last")
    kcfg = cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"strategy": strat})})
    got = FedMICSite().personal_model(kcfg, site, glob)
    assert got is not None
    choice = json.loads(SiteState(RunLayout(cfg.run_dir).site(site).state).choice_path.read_text())
    scores = choice["val_dice"]
    assert set(scores) == set(AUTO_CANDIDATES) and all(v is not None for v in scores.values())
    assert len(set(scores.values())) > 1 and scores[choice["kind"]] == max(scores.values())
    want = FedMICSite()._assemble(kcfg, site, glob, choice["kind"])
    assert got[1] == want[1] and all(torch.equal(got[0][k], want[0][k]) for k in want[0])
    # a state saved before the local student was kept: a one-line error, not a wrong model
    st = SiteState(RunLayout(cfg.run_dir).site(site).state)
    r = st.personal_round()
    assert r is not None
    st.save_personal(r, {k: v for k, v in personal.items() if not k.startswith("local.")})
    strat = dict(cfg.federation.strategy, personal="student+local")
    kcfg = cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"strategy": strat})})
    with pytest.raises(FedpathError, match="no local student"):
        FedMICSite().personal_model(kcfg, site, glob)
    st.save_personal(r, personal)


@pytest.mark.slow  # two rounds of two sites with teacher + student: ~1 min on a busy 2-core machine
def test_fedmic_federation_two_sites_low_rank_both_ways(
    stores: tuple[Path, Path], data_root: Path, repo_root: Path
) -> None:
    from federation.site_state import SiteState
    from federation.wire import read_header
    from fedpath.simulate import run_simulation
    from pipeline.checkpoint import read_model_file

    cfg = _fresh(stores, data_root, repo_root, "sim")
    summary = run_simulation(cfg)
    assert summary["rounds"] == 2 and summary["strategy"].startswith("fedmic")
    g2, meta = read_model_file(RunLayout(cfg.run_dir).server.global_model(2))
    assert [u["site"] for u in meta.extra["updates"]] == sorted(SITES)
    full_bytes = RunLayout(cfg.run_dir).server.global_model(2).stat().st_size
    for site in SITES:
        lay = RunLayout(cfg.run_dir).site(site)
        t0 = json.loads(lay.train_json(0).read_text())
        t1 = json.loads(lay.train_json(1).read_text())
        assert t0["payload"] == t1["payload"] == "lowrank_delta"
        assert t0["bytes_up"] < full_bytes and t1["bytes_up"] < full_bytes
        assert t1["bytes_down"] < full_bytes  # round 1 downloaded factors onto the kept version 0
        kept = json.loads((lay.round(1) / "done.json").read_text())
        assert kept["outcome"] == "uploaded"
        assert SiteState(lay.state).personal_round() == 1
        # the teacher never left the site: no stored update names a teacher tensor
        for r in (0, 1):
            stored = RunLayout(cfg.run_dir).server.update(r, site)
            assert not any("teacher" in k for k in read_header(stored).specs)
        # `fedpath site-model`: the personal teacher as a model file `fedpath infer --model` runs
        from federation.site import write_site_model
        from pipeline.infer import load_inference_model

        mine = load_inference_model(write_site_model(cfg, site))
        # the personal model is the round's teacher with the best Dice on the site's validation split
        scores = [json.loads(lay.train_json(r).read_text())["metrics"]["val_teacher_dice"] for r in (0, 1)]
        best = SiteState(lay.state).load_best()
        assert best is not None and best[1]["round"] == (0 if scores[0] > scores[1] else 1)
        personal = best[0]
        assert mine.meta.source == "personal"
        assert mine.meta.model.channels != cfg.model.channels  # the teacher's wider network
        assert all(torch.equal(v, personal[f"teacher.{k}"]) for k, v in mine.state.items())
        # personal: teacher+student -- one ensemble network: the teacher's and the global student's logits averaged
        from pipeline.models import build_model

        strat = dict(cfg.federation.strategy, personal="teacher+student")  # type: ignore[arg-type]
        both_cfg = cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"strategy": strat})})
        both = load_inference_model(write_site_model(both_cfg, site, out=cfg.run_dir / f"{site}_both.safetensors"))
        assert both.meta.model.name == "ensemble" and len(both.meta.model.members) == 2
        ens = build_model(both.meta.model)
        ens.load_state_dict(both.state)
        teacher = build_model(mine.meta.model)
        teacher.load_state_dict(mine.state)
        student = build_model(cfg.model)
        student.load_state_dict(g2)
        x = torch.rand(1, 3, 32, 32)
        with torch.no_grad():
            want = (teacher.eval()(x) + student.eval()(x)) / 2
            assert torch.allclose(ens.eval()(x), want, atol=1e-5)


def test_one_way_distillation_leaves_the_student_its_task_gradient_only() -> None:
    """``student_distill: 0``: the student's gradient is its task loss's alone (as FedAvg's model trains),
    while the teacher still learns from the student; at 1 the student learns from the teacher too."""
    from monai.losses import DiceCELoss

    from federation.fedmic_site import MutualLoss

    torch.manual_seed(0)
    ys = torch.randn(2, 3, 8, 8, requires_grad=True)
    yt, ps, ht = torch.randn(2, 3, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    yt.requires_grad_(True), ps.requires_grad_(True), ht.requires_grad_(True)
    y = torch.randint(0, 3, (2, 1, 8, 8))
    base = DiceCELoss(to_onehot_y=True, softmax=True)
    task_grad = torch.autograd.grad(base(ys, y), ys)[0]
    grads = {}
    for share in (0.0, 1.0):
        loss = MutualLoss(base, 2.0, 1.0, 1.0, student_share=share)((ys, yt, ps, ht), y)
        grads[share] = torch.autograd.grad(loss, (ys, yt, ps))
    assert torch.allclose(grads[0.0][0], task_grad, atol=1e-7)
    assert float(grads[0.0][2].abs().max()) == 0.0  # the projection's (student-side) feature term is off
    assert not torch.allclose(grads[1.0][0], task_grad, atol=1e-4)
    assert torch.allclose(grads[0.0][1], grads[1.0][1])  # the teacher learns from the student either way


def test_teacher_starts_from_teacher_init_of_its_own_architecture(tmp_path: Path) -> None:
    """``teacher_init`` (the site's own strategy config): a site's first round starts its teacher from that
    file, e.g. the server's synthetic θ_pre of the teacher's architecture; unset, a seeded init (which differs,
    so the check can fail); a file of another architecture is a one-line error naming it."""
    from federation.fedmic_site import MutualHooks, teacher_config
    from federation.payloads import FitConfig
    from federation.site_state import SiteState
    from pipeline.checkpoint import ModelMeta, save_model
    from pipeline.config import ModelConfig
    from pipeline.models import build_model

    model = ModelConfig(name="unet", channels=[8, 16], strides=[2], num_res_units=0, groups=4, out_channels=3)
    tcfg = teacher_config(model, 1.5)
    torch.manual_seed(123)
    pre = {k: v.clone() for k, v in build_model(tcfg).state_dict().items()}
    good, wrong = tmp_path / "teacher_pre.safetensors", tmp_path / "student_pre.safetensors"
    save_model(good, pre, ModelMeta(model=tcfg, tile_size=64, target_mpp=1.0, source="pretrained"))
    save_model(wrong, build_model(model).state_dict(), ModelMeta(model=model, tile_size=64, target_mpp=1.0, source="pretrained"))

    def teacher(init: Path | None) -> dict[str, torch.Tensor]:
        strategy: dict[str, Any] = {"name": "fedmic", "teacher_width": 1.5, "teacher_init": None if init is None else str(init)}
        cfg = ExperimentConfig(run_dir=tmp_path / "run", model=model, federation={"strategy": strategy})
        hooks = MutualHooks(cfg, FitConfig(extra={"teacher_width": 1.5}), SiteState(tmp_path / "run" / "state"))
        pair = hooks.wrap(build_model(model))
        return {k: v.detach() for k, v in pair.teacher.state_dict().items()}  # type: ignore[union-attr]

    started = teacher(good)
    assert all(torch.equal(started[k], pre[k]) for k in pre)
    seeded = teacher(None)
    assert any(not torch.equal(seeded[k], pre[k]) for k in pre if k.endswith("weight"))
    with pytest.raises(FedpathError, match=r"student_pre.safetensors: teacher_init is a unet with channels \[8, 16\]"):
        teacher(wrong)
