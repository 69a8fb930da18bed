"""FedMIC rows of the real-data experiment: personalised Dice, the student as a global model, wire bytes.

For each privacy level (no DP, and ε = 8 per tile over the whole training, as the FedDP rows) FedMIC runs
through the real aggregator with the experiment's model as the shared student, and is set beside the
FedAvg run of the same level (``fedavg`` / ``feddp eps=8``):

* per site, Dice of the site's *personalised* model (its teacher, read from its private state) on the
  site's own test split, beside FedAvg's global model on the same split;
* the student (the last global version) evaluated as a global model on every site's test split (the
  ordinary experiment row);
* bytes uploaded and downloaded per site per round, as sent on the wire: the update body the site posted
  (``rounds/<r>/update.safetensors``) and the model bodies it received (``train.json`` ``bytes_down``),
  with the ratio to FedAvg's.

``fedpath experiment --config configs/experiment_real.yaml --set 'experiment.variants=[fedmic]'`` runs only
these rows and their FedAvg baselines. With ``experiment.start: synthetic`` (that config) the student starts
from the server's synthetic θ_pre, as every other row does, and each site's teacher from the same pretraining
of the teacher's architecture (``teacher_init``); ``--set experiment.start=scratch --set experiment.dp_lr=null``
gives the seeded start the README's earlier FedMIC figures were measured with.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from fedcore.layout import RunLayout
from fedpath.experiment import dp_changes
from fedpath.seedstats import spread
from pipeline.config import ExperimentConfig

log = logging.getLogger(__name__)

#: FedMIC's settings in the experiment (the teacher 1.5x wider keeps the 2-core run within minutes)
FEDMIC_STRATEGY: dict[str, Any] = {
    "name": "fedmic",
    "energy_start": 0.90,
    "energy_end": 0.98,
    "energy_rounds": 4,
    "teacher_width": 1.5,
    # int8 factors at 0.7 of the break-even rank: float16's bytes at 0.35 for twice the rank (without DP the
    # cap binds on every tensor; the student came 0.002-0.013 from FedAvg's model instead of 0.010-0.018)
    "factor_dtype": "int8",
    "max_rank_fraction": 0.7,
    # one-way: the student learns its task only, the teacher learns from it (README, FedMIC section)
    "student_distill": 0.0,
    # the configured personal model (every kind is scored, PERSONAL_KINDS): teacher, global student and the
    # site's own last local student, logits averaged. Seeds 0-2, Δ against FedAvg / FedDP (breast/GI,
    # kidney/bladder, lung/prostate, GBM40): no DP +0.004 / +0.011 / +0.008 / −0.000, ε = 8 +0.006 / +0.025 /
    # +0.016 / −0.002, against teacher+student's +0.001 / +0.002 / +0.005 / +0.000 and +0.005 / +0.022 /
    # +0.009 / −0.004 (README, FedMIC)
    "personal": "teacher+student+local",
    "personal_select": "best",  # each site's best teacher on its own validation split (README, FedMIC)
    # under DP the student clipped to C·√0.7 and the teacher to C·√0.3 instead of one clip over the pair (where
    # the student got 0.5-0.75 of C): at ε = 8, seeds 0-1, the student 0.001 from FedDP's model on every site
    # instead of 0.004-0.015, teacher+student − FedDP +0.003 / +0.017 / +0.014 / −0.003 (joint: −0.001 /
    # +0.009 / +0.009 / −0.004)
    "dp_student_clip_share": 0.7,
}


def fedmic_strategy(cfg: ExperimentConfig) -> dict[str, Any]:
    """The FedMIC rows' strategy: :data:`FEDMIC_STRATEGY` with ``experiment.fedmic`` over it and the energy
    schedule no longer than the federation. Checked by the strategy's own config, so a bad key or value is
    a one-line :class:`~pipeline.errors.ConfigError` before anything trains."""
    from federation.strategies.registry import strategy_config

    strategy = {**FEDMIC_STRATEGY, **cfg.experiment.fedmic, "name": "fedmic"}
    strategy["energy_rounds"] = max(1, min(int(strategy["energy_rounds"]), cfg.federation.rounds))
    strategy_config(cfg.federation.model_copy(update={"strategy": strategy}), "experiment.fedmic")
    return strategy


#: settings that only pick among the personal models a row has already scored (``personal_models``): training
#: never reads them, so a row or an interrupted run that differs only here is kept
SCORING_ONLY = ("personal",)
#: settings that act only under DP-SGD: the row without DP is kept when only these differ
DP_ONLY = ("dp_student_clip_share",)


def _training_settings(cfg: ExperimentConfig, strategy: dict[str, Any], dp: bool = True) -> dict[str, Any]:
    """``strategy`` validated (defaults spelt out or not agree), without :data:`SCORING_ONLY` (nor
    :data:`DP_ONLY` for a row without DP)."""
    from federation.strategies.registry import strategy_config

    full = strategy_config(cfg.federation.model_copy(update={"strategy": strategy}))
    return full.model_dump(exclude=set(SCORING_ONLY) | (set() if dp else set(DP_ONLY)))


def _trained_with(cfg: ExperimentConfig, vdir: Path, strategy: dict[str, Any], dp: bool = True) -> bool:
    """Whether the federation in ``vdir`` (finished or interrupted) was started with ``strategy``'s
    training settings, as its frozen config says."""
    import yaml

    from fedpath.simulate import frozen_config_path
    from pipeline.config import ConfigError

    frozen = frozen_config_path(vdir)
    if not frozen.is_file():
        return True  # nothing trained yet
    try:
        old = yaml.safe_load(frozen.read_text())["federation"]["strategy"]
        was = _training_settings(cfg, old, dp)
    except (ConfigError, KeyError, TypeError, AttributeError, yaml.YAMLError):
        return False  # unreadable or from another version: not these settings
    return was == _training_settings(cfg, strategy, dp)


#: the ε of the DP row (and the FedDP row it is compared with)
FEDMIC_EPSILON = 8.0

Record = Callable[[str, str, dict[str, torch.Tensor], float, Path, dict[str, Any]], None]
#: (config whose ``model`` is the network, its state, site) -> that site's test metrics
EvaluateOwn = Callable[[ExperimentConfig, dict[str, torch.Tensor], str], dict[str, Any]]


#: the personal models a FedMIC site can infer with (``federation.strategy.personal``); ``auto`` is the one of
#: the others that the site's own validation split picks
PERSONAL_KINDS = ("teacher", "student", "teacher+student", "student+local", "teacher+student+local", "auto")


def personalised_dice(
    vcfg: ExperimentConfig, evaluate: EvaluateOwn, student: dict[str, torch.Tensor]
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per personal-model kind, each site's personal model (from its private state; ``student`` is the
    last published global version) on that site's own test split, scored by ``evaluate`` exactly as the
    experiment scores every other row (whole images at full resolution)."""
    from federation.fedmic_site import FedMICSite
    from federation.site_state import SiteState

    out: dict[str, dict[str, dict[str, Any]]] = {k: {} for k in PERSONAL_KINDS}
    for kind in PERSONAL_KINDS:
        strat = dict(vcfg.federation.strategy, personal=kind)  # type: ignore[arg-type]
        kcfg = vcfg.model_copy(update={"federation": vcfg.federation.model_copy(update={"strategy": strat})})
        for s in kcfg.sites:
            if not SiteState(RunLayout(kcfg.run_dir).site(s.name).state).personal_path.is_file():
                continue  # the site never finished a round: no teacher
            if kind == "auto":  # the site's choice on its validation split, one of the kinds scored above
                choice = FedMICSite().choose_personal(kcfg, s.name, student)
                out[kind][s.name] = {**out[choice["kind"]][s.name], "chosen": choice["kind"], "val_dice": choice["val_dice"]}
                continue
            own = FedMICSite().personal_model(kcfg, s.name, student)
            assert own is not None
            state, net_cfg = own
            out[kind][s.name] = evaluate(kcfg.model_copy(update={"model": net_cfg}), state, s.name)
    return out


def baseline_local_dice(
    vcfg: ExperimentConfig, base_vdir: Path, evaluate: EvaluateOwn, base_global: dict[str, torch.Tensor]
) -> dict[str, dict[str, Any]]:
    """FedAvg's (or FedDP's) own local adaptation, the personalisation every FedAvg site has without
    FedMIC (Yu et al. 2020): per site, the baseline's final global model and the site's own model after its
    last round's local steps (that job's final checkpoint), logits averaged, on the site's own test images,
    as :func:`personalised_dice` scores FedMIC's ``student+local``."""
    from pipeline.checkpoint import strip_wrappers
    from pipeline.models import ensemble_state
    from pipeline.train import job_checkpoint

    out: dict[str, dict[str, Any]] = {}
    last = vcfg.federation.rounds - 1
    for s in vcfg.sites:
        ck = job_checkpoint(RunLayout(base_vdir).site(s.name).round(last))
        if ck is None or not (ck / "model.safetensors").is_file():
            continue  # the site did not train the last round
        local = strip_wrappers(load_file(str(ck / "model.safetensors")))
        both, net_cfg = ensemble_state([(base_global, vcfg.model), (local, vcfg.model)])
        out[s.name] = evaluate(vcfg.model_copy(update={"model": net_cfg}), both, s.name)
    return out


def wire_bytes(run_dir: Path, sites: list[str], rounds: int) -> dict[str, dict[str, float]]:
    """Mean bytes per round per site: the update bodies posted and the model bodies downloaded."""
    out: dict[str, dict[str, float]] = {}
    lay = RunLayout(run_dir)
    for s in sites:
        up, down = [], []
        for r in range(rounds):
            body = lay.site(s).update(r)
            if body.is_file():
                up.append(body.stat().st_size)
            tj = lay.site(s).train_json(r)
            if tj.is_file():
                got = json.loads(tj.read_text()).get("bytes_down")
                down.append(got if got is not None else lay.server.global_model(r).stat().st_size)
        out[s] = {
            "up_per_round": sum(up) / len(up) if up else float("nan"),
            "down_per_round": sum(down) / len(down) if down else float("nan"),
        }
    return out


def run_fedmic_variants(
    cfg: ExperimentConfig,
    variants_dir: Path,
    rows: dict[str, dict[str, Any]],
    record: Record,
    variant_cfg: Callable[..., ExperimentConfig],
    link_stores: Callable[[ExperimentConfig, ExperimentConfig], None],
    final_global: Callable[[Path], dict[str, torch.Tensor]],
    evaluate_own: EvaluateOwn,
) -> None:
    """Add the ``fedmic`` and ``fedmic eps=8`` rows (and their FedAvg baselines if missing) to ``rows``."""
    from fedpath.simulate import run_simulation

    names = [s.name for s in cfg.sites]
    rounds = cfg.federation.rounds
    strategy = fedmic_strategy(cfg)  # the same for both privacy levels
    if cfg.experiment.start == "synthetic" and strategy.get("teacher_init") is None:
        # the student starts from θ_pre (version 0, as every row does) and each site's teacher from the same
        # pretraining of its own, wider architecture
        from fedpath.pretrain import run_teacher_pretrain

        strategy["teacher_init"] = run_teacher_pretrain(cfg, float(strategy["teacher_width"]))["path"]
    for eps in (None, FEDMIC_EPSILON):
        tag = "" if eps is None else f" eps={eps:g}"
        baseline = "fedavg" if eps is None else f"feddp eps={eps:g}"
        base_dirname = "fedavg" if eps is None else f"feddp_eps_{eps:g}"
        if baseline not in rows:
            vdir = variants_dir / base_dirname
            vcfg = variant_cfg(cfg, base_dirname, vdir, federation__strategy="fedavg", **dp_changes(cfg, eps))
            link_stores(cfg, vcfg)
            t0 = time.perf_counter()
            run_simulation(vcfg)
            record(baseline, "federated", final_global(vdir), time.perf_counter() - t0, vdir, {})
        name = f"fedmic{tag}"
        vdir = variants_dir / name.replace(" ", "_").replace("=", "_")
        row = rows.get(name, {})
        if row.get("fedmic", {}).get("strategy") == strategy:
            continue
        if _rescored(cfg, name, row, strategy, vdir, record, final_global, dp=eps is not None):
            continue
        if vdir.exists() and not _trained_with(cfg, vdir, strategy, dp=eps is not None):  # finished or not, its state is stale
            log.info("experiment: %s was trained with other FedMIC settings; training it again", name)
            shutil.rmtree(vdir)
        # a federation resumed (or found finished) here: its record's wall time, when that record is of the
        # same training, plus this invocation's
        earlier = _earlier_seconds(cfg, row, strategy, dp=eps is not None) if vdir.exists() else 0.0
        vcfg = variant_cfg(cfg, name, vdir, federation__strategy=strategy, **dp_changes(cfg, eps))
        link_stores(cfg, vcfg)
        t0 = time.perf_counter()
        run_simulation(vcfg)
        seconds = time.perf_counter() - t0 + earlier
        student = final_global(vdir)
        personal = personalised_dice(vcfg, evaluate_own, student)
        base_vdir = variants_dir / base_dirname
        base_local = baseline_local_dice(vcfg, base_vdir, evaluate_own, final_global(base_vdir))
        mic_bytes = wire_bytes(vdir, names, rounds)
        avg_bytes = wire_bytes(base_vdir, names, rounds)
        extra = {
            "fedmic": {
                "baseline": baseline,
                "strategy": strategy,
                "personalised": personal[strategy["personal"]],  # the configured personal model
                "personal_models": personal,  # every kind, so each is measured
                "baseline_local": base_local,  # FedAvg's global model + the site's own last local model
                "bytes": mic_bytes,
                "baseline_bytes": avg_bytes,
                "up_ratio": {s: avg_bytes[s]["up_per_round"] / mic_bytes[s]["up_per_round"] for s in names},
                "down_ratio": {s: avg_bytes[s]["down_per_round"] / mic_bytes[s]["down_per_round"] for s in names},
            }
        }
        record(name, "federated", student, seconds, vdir, extra)


def _same_training(cfg: ExperimentConfig, done: dict[str, Any], strategy: dict[str, Any], dp: bool) -> bool:
    """Whether a FedMIC record (``done``) was trained with ``strategy``'s training settings; a record from
    another version is not."""
    from pipeline.config import ConfigError

    try:
        return bool(done) and _training_settings(cfg, done.get("strategy", {}), dp) == _training_settings(cfg, strategy, dp)
    except (ConfigError, TypeError, AttributeError):
        return False


def _earlier_seconds(cfg: ExperimentConfig, row: dict[str, Any], strategy: dict[str, Any], dp: bool) -> float:
    """The wall time an earlier record of this row spent training the same federation, or 0."""
    return float(row.get("seconds", 0.0)) if _same_training(cfg, row.get("fedmic", {}), strategy, dp) else 0.0


def _rescored(
    cfg: ExperimentConfig,
    name: str,
    row: dict[str, Any],
    strategy: dict[str, Any],
    vdir: Path,
    record: Record,
    final_global: Callable[[Path], dict[str, torch.Tensor]],
    dp: bool = True,
) -> bool:
    """A finished row trained with the same settings as ``strategy`` but another ``personal`` (or, without
    DP, another DP-only setting): the configured personal model is one it already scored, so it is recorded
    as the personalised one, nothing retrained."""
    done = row.get("fedmic", {})
    if not vdir.is_dir() or not _same_training(cfg, done, strategy, dp):
        return False  # nothing trained, other settings, or a record from another version: train again
    scored = done.get("personal_models", {}).get(strategy["personal"])
    if not scored or "baseline_local" not in done:
        return False  # (a record from before FedAvg's local adaptation was scored: score it, train nothing)
    log.info("experiment: %s already scored %s as a personal model; recording it, not training again", name, strategy["personal"])
    extra = {"fedmic": {**done, "strategy": strategy, "personalised": scored}}
    record(name, "federated", final_global(vdir), float(row.get("seconds", 0.0)), vdir, extra)
    return True


def fedmic_table(runs: dict[str, dict[str, Any]], sites: list[str]) -> str:
    """Per FedMIC row and site, over seeds (mean ± sd): the personalised model and FedAvg's global model of
    the same privacy level on the site's own test images, their paired difference (same seed, same
    images), the student as a global model, and bytes per round on the wire with the ratio to FedAvg."""
    head = ["variant", "site", "seeds", "personal model", "Dice personalised", "Dice FedAvg global"]
    head += [f"Δ {k} − FedAvg" for k in PERSONAL_KINDS] + ["Δ FedAvg global+local − FedAvg"]
    head += ["Dice student (global)", "KiB up / round", "KiB down / round", "up: FedAvg ÷ FedMIC", "down: FedAvg ÷ FedMIC"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    names = sorted({r["name"] for r in runs.values() if r.get("fedmic")})
    for name in names:
        per_seed = sorted((r for r in runs.values() if r["name"] == name and r.get("fedmic")), key=lambda r: r["seed"])
        kinds = sorted({str(r["fedmic"].get("strategy", {}).get("personal", "teacher")) for r in per_seed})
        for s in sites:
            picked = [r["fedmic"].get("personal_models", {}).get("auto", {}).get(s, {}).get("chosen") for r in per_seed]
            picks = ", ".join(f"{k} ×{picked.count(k)}" for k in dict.fromkeys(p for p in picked if p))
            chosen: list[Any] = []
            adapted: list[Any] = []
            delta: dict[str, list[Any]] = {k: [] for k in PERSONAL_KINDS}
            base, student, up, down, r_up, r_down = ([] for _ in range(6))
            for r in per_seed:
                mic = r["fedmic"]
                b = runs.get(f"{mic['baseline']}@{r['seed']}", {}).get("eval", {}).get(s, {}).get("dice")
                models = mic.get("personal_models", {})  # older records scored the teacher on tiles: not shown
                for k in PERSONAL_KINDS:
                    p = models.get(k, {}).get(s, {}).get("dice")
                    delta[k].append(p - b if p is not None and b is not None else None)
                bl = mic.get("baseline_local", {}).get(s, {}).get("dice")
                adapted.append(bl - b if bl is not None and b is not None else None)
                chosen.append(mic.get("personalised", {}).get(s, {}).get("dice"))
                base.append(b)
                student.append(r["eval"].get(s, {}).get("dice"))
                up.append(mic["bytes"][s]["up_per_round"] / 1024)
                down.append(mic["bytes"][s]["down_per_round"] / 1024)
                r_up.append(mic["up_ratio"][s])
                r_down.append(mic["down_ratio"][s])
            cells = [name, s, str(len(per_seed)), " / ".join(kinds) + (f" (auto: {picks})" if picks else ""), spread(chosen), spread(base)]
            cells += [spread(delta[k]) for k in PERSONAL_KINDS] + [spread(adapted)]
            cells += [spread(student), spread(up, 1), spread(down, 1), spread(r_up, 2), spread(r_down, 2)]
            lines.append("| " + " | ".join(cells) + " |")
    if len(lines) == 2:
        return ""
    return (
        "\nFedMIC (each site's personal model -- its teacher, global student and/or own last local student, logits "
        "averaged (Δ for every kind scored; auto: the kind each site's own validation split picked) -- vs "
        "FedAvg's global model of the same privacy level, on the site's own test images; bytes on the wire per "
        "site per round; mean ± sd over seeds, Δ paired by seed):\n\n" + "\n".join(lines) + "\n"
    )
