"""FedMIC on the site: a personal teacher (larger, never sent) and the shared student, mutually distilled.

One local job trains a :class:`MutualPair` -- student (the global model's architecture, initialised from
the downloaded version), teacher (``teacher_width`` times the channels, kept in the site's private state
between rounds) and a learned 1x1 projection of the student's first-block features to the teacher's --
with one loss:

* the task loss (DiceCE) of both models;
* decision level: per-pixel KL between the softened outputs (temperature T, scaled by T^2), in both
  directions, each direction weighted per sample by how correct the *other* model is on it (pixel
  accuracy, no gradient), so a model learns from its peer where the peer is right;
* representation level: MSE between the projected student features and the teacher's, weighted the
  same way.

Privacy: the pair is one module, so DP-SGD clips each sample's gradient over *all* its parameters
(student, teacher and projection together) and adds one Gaussian noise per step: one subsampled Gaussian
mechanism per step, accounted by the site's ordinary ledger. The teacher never leaves the site, but it
shapes the student through distillation; it is itself a function of the earlier noisy steps only, so
the student's release is covered by the same adaptive composition, and ε is exactly DP-SGD's over the
job's steps -- not a sum of two budgets.

The teacher, the projection, their optimiser state and the last global version live in
``sites/<site>/state/`` (:class:`~federation.site_state.SiteState`), saved atomically after each round.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F  # noqa: N812
from safetensors.torch import load_file
from torch import nn

from fedcore.layout import RunLayout
from federation.lowrank import compress_with_feedback, decompress_one
from federation.payloads import FitConfig
from federation.site_state import SiteState
from federation.strategies.fedmic import apply_delta
from federation.wire import state_digest
from pipeline.config import ExperimentConfig, ModelConfig
from pipeline.errors import FedpathError
from pipeline.models import ensemble_state

if TYPE_CHECKING:
    from federation.client import SiteClient
    from federation.strategies.base import Strategy
    from pipeline.train import TrainResult

log = logging.getLogger(__name__)
State = dict[str, torch.Tensor]


def teacher_config(model: ModelConfig, width: float) -> ModelConfig:
    """The teacher's architecture: the student's, with ``width`` times the channels (GroupNorm-divisible)."""
    g = model.groups
    channels = [max(g, int(round(c * width / g)) * g) for c in model.channels]
    return model.model_copy(update={"channels": channels})


class MutualPair(nn.Module):
    """Student, teacher and the student->teacher feature projection, trained as one module."""

    def __init__(self, student: nn.Module, teacher: nn.Module, c_student: int, c_teacher: int) -> None:
        super().__init__()
        self.student, self.teacher = student, teacher
        self.proj = nn.Conv2d(c_student, c_teacher, kernel_size=1)
        for m in (student, teacher):
            if not isinstance(getattr(m, "model", None), nn.Sequential):
                raise FedpathError("fedmic: the model must be a MONAI UNet (features are its first block's)")

    @staticmethod
    def _run(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        body: nn.Sequential = net.model  # type: ignore[assignment]
        h = body[0](x)
        return body[1:](h), h

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        ys, hs = self._run(self.student, x)
        yt, ht = self._run(self.teacher, x)
        return ys, yt, self.proj(hs), ht


class MutualLoss:
    """Task loss of both models + correctness-weighted KL and feature distillation, per sample."""

    def __init__(
        self, base: Any, temperature: float, kd_weight: float, feature_weight: float, student_share: float = 1.0
    ) -> None:
        self.base, self.t, self.kd_w, self.feat_w = base, temperature, kd_weight, feature_weight
        self.s_w = student_share  # weight of the student's learning-from-the-teacher terms (0: one-way)

    def __call__(self, out: tuple[torch.Tensor, ...], y: torch.Tensor) -> torch.Tensor:
        ys, yt, ps, ht = out
        task = self.base(ys, y) + self.base(yt, y)
        with torch.no_grad():
            lab = y[:, 0].long()
            acc_s = (ys.argmax(1) == lab).float().mean((1, 2))
            acc_t = (yt.argmax(1) == lab).float().mean((1, 2))
        t = self.t
        ls, lt = F.log_softmax(ys / t, 1), F.log_softmax(yt / t, 1)
        kl_s = (lt.exp().detach() * (lt.detach() - ls)).sum(1).mean((1, 2))  # KL(teacher || student)
        kl_t = (ls.exp().detach() * (ls.detach() - lt)).sum(1).mean((1, 2))  # KL(student || teacher)
        kd = (self.s_w * acc_t * kl_s + acc_s * kl_t).mean() * t * t
        f_s = (ps - ht.detach()).pow(2).mean((1, 2, 3))
        f_t = (ht - ps.detach()).pow(2).mean((1, 2, 3))
        feat = (self.s_w * acc_t * f_s + acc_s * f_t).mean()
        return task + self.kd_w * kd + self.feat_w * feat


class MutualHooks:
    """The extra-model / extra-loss hooks :func:`pipeline.train.train_local` calls for FedMIC."""

    def __init__(self, cfg: ExperimentConfig, fit: FitConfig, state: SiteState) -> None:
        self.cfg, self.fit, self.state = cfg, fit, state
        self.pair: MutualPair | None = None

    def wrap(self, student: nn.Module) -> nn.Module:
        from pipeline.models import build_model

        width = float(self.fit.extra.get("teacher_width", 2.0))
        tcfg = teacher_config(self.cfg.model, width)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.train.seed + 1)
            teacher = build_model(tcfg)
            pair = MutualPair(student, teacher, self.cfg.model.channels[0], tcfg.channels[0])
        personal = self.state.load_personal()
        if personal is not None:
            own = {k: v for k, v in personal.items() if not k.startswith(("student.", "local."))}
            missing, unexpected = pair.load_state_dict(own, strict=False)
            if unexpected or any(not k.startswith("student.") for k in missing):
                raise FedpathError(f"{self.state.personal_path}: personal state does not fit the teacher")
        else:
            self._init_teacher(pair.teacher, tcfg)
        self.pair = pair
        return pair

    def _init_teacher(self, teacher: nn.Module, tcfg: ModelConfig) -> None:
        """A site's first round: the teacher from ``teacher_init`` of the site's own strategy config, if set
        (a file of the teacher's architecture; anything else is a one-line error naming the file)."""
        from federation.strategies import strategy_config
        from pipeline.checkpoint import read_model_file

        path = getattr(strategy_config(self.cfg.federation), "teacher_init", None)
        if path is None:
            return
        state, meta = read_model_file(path)
        if meta.model != tcfg:
            raise FedpathError(
                f"{path}: teacher_init is a {meta.model.name} with channels {meta.model.channels}, the teacher is "
                f"a {tcfg.name} with channels {tcfg.channels}"
            )
        try:
            teacher.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise FedpathError(f"{path}: teacher_init does not fit the teacher ({str(exc).splitlines()[0]})") from None

    def criterion(self, base: Any) -> MutualLoss:
        x = self.fit.extra
        return MutualLoss(
            base,
            float(x.get("temperature", 2.0)),
            float(x.get("kd_weight", 1.0)),
            float(x.get("feature_weight", 1.0)),
            float(x.get("student_distill", 1.0)),
        )

    def clip_shares(self) -> dict[str, float] | None:
        """DP-SGD's clip groups: the student's share of C² and the rest (teacher, projection), or None for
        one clip over the pair (``dp_student_clip_share``)."""
        share = self.fit.extra.get("dp_student_clip_share")
        return None if share is None else {"student.": float(share), "": 1.0 - float(share)}

    def on_optimizer(self, opt: torch.optim.Optimizer) -> None:
        from pipeline.train import load_optimizer_tensors

        saved = self.state.load_optimizer()
        if saved is not None:
            load_optimizer_tensors(opt, *saved)

    @staticmethod
    def validated_models(pair: nn.Module) -> dict[str, nn.Module]:
        """Models scored on the site's validation split beside the shared one (``val_<name>_dice``)."""
        assert isinstance(pair, MutualPair)
        return {"teacher": pair.teacher}

    @staticmethod
    def shared_state(pair: nn.Module) -> State:
        assert isinstance(pair, MutualPair)
        return dict(pair.student.state_dict())

    @staticmethod
    def shared_model(pair: nn.Module) -> nn.Module:
        assert isinstance(pair, MutualPair)
        return pair.student


#: the personal models ``personal: auto`` chooses from, in the order that breaks a tie
AUTO_CANDIDATES = ("student", "student+local", "teacher+student", "teacher+student+local", "teacher")


class FedMICSite:
    """FedMIC's site algorithm: compressed downloads onto the kept version, mutual distillation."""

    def personal_model(
        self, cfg: ExperimentConfig, site: str, global_state: State
    ) -> tuple[State, ModelConfig] | None:
        """The site's personal model (``personal``, members joined by ``+``, logits averaged): ``teacher`` (the
        best round's on its validation split, or with ``personal_select: last`` its last round's),
        ``student`` (``global_state``, the shared student as published) and ``local`` (the site's own student
        after its last round's local steps, before averaging: FedAvg's local adaptation, Yu et al. 2020)."""
        from federation.strategies import strategy_config

        kind = str(getattr(strategy_config(cfg.federation), "personal", "teacher"))
        if kind == "auto":
            kind = self.choose_personal(cfg, site, global_state)["kind"]
        return self._assemble(cfg, site, global_state, kind)

    def choose_personal(self, cfg: ExperimentConfig, site: str, global_state: State) -> dict[str, Any]:
        """``personal: auto``: the site scores every candidate (:data:`AUTO_CANDIDATES`, the global student
        alone among them) on its own validation tiles, as its early stopping does, and keeps the best; on a tie
        the first listed. Its own data only, after the federation: no upload, no ε (the validation split never
        trains). The choice and every score are written to the site's state (``personal_choice.json``)."""
        from fedcore.io import atomic_write_json
        from pipeline.models import build_model
        from pipeline.train import validation_score

        scores: dict[str, float | None] = {}
        for kind in AUTO_CANDIDATES:
            state, net_cfg = self._assemble(cfg, site, global_state, kind)
            net = build_model(net_cfg)
            net.load_state_dict(state)
            scores[kind] = validation_score(cfg, cfg.run_dir, site, net)
        scored = [k for k in AUTO_CANDIDATES if scores[k] is not None]
        if not scored:
            raise FedpathError(f"site {site}: personal: auto needs a validation split (train.val_fraction), and it has none")
        best = max(scored, key=lambda k: (scores[k], -AUTO_CANDIDATES.index(k)))
        choice = {"kind": best, "val_dice": scores}
        atomic_write_json(SiteState(RunLayout(cfg.run_dir).site(site).state).choice_path, choice)
        return choice

    def _assemble(self, cfg: ExperimentConfig, site: str, global_state: State, kind: str) -> tuple[State, ModelConfig]:
        from federation.strategies import strategy_config

        state = SiteState(RunLayout(cfg.run_dir).site(site).state)
        scfg = strategy_config(cfg.federation)
        parts = kind.split("+")
        best = state.load_best() if getattr(scfg, "personal_select", "last") == "best" else None
        last = state.load_personal() if best is None or "local" in parts else None  # one file read where it does
        personal = best[0] if best is not None else last
        if personal is None or ("local" in parts and last is None):
            raise FedpathError(f"site {site}: no personal teacher yet ({state.personal_path}); run a round first")
        tcfg = teacher_config(cfg.model, float(getattr(scfg, "teacher_width", 2.0)))
        members: list[tuple[State, ModelConfig]] = []
        for part in parts:
            if part == "teacher":
                members.append(({k[len("teacher.") :]: v for k, v in personal.items() if k.startswith("teacher.")}, tcfg))
            elif part == "student":
                if not global_state:
                    raise FedpathError(f"site {site}: personal: {kind} needs the global student (a published version)")
                members.append((global_state, cfg.model))
            else:
                assert last is not None
                local = {k[len("local.") :]: v for k, v in last.items() if k.startswith("local.")}
                if not local:
                    raise FedpathError(f"{state.personal_path}: no local student (saved before personal: {kind} existed); train a round")
                members.append((local, cfg.model))
        return ensemble_state(members)

    def contributed_enough(self, cfg: ExperimentConfig, site: str, uploaded: list[int]) -> bool:
        return False  # round-based: a site trains every round

    def encode_update(
        self, strategy: Strategy, cfg: ExperimentConfig, site: str, r: int, delta: State, fit: FitConfig
    ) -> State:
        """The low-rank upload with error feedback (Seide et al. 2014; Karimireddy et al. 2019): the part of
        the earlier deltas their factors left out is added to this delta before it is factorised, and what
        these factors leave out is kept, in the site's private state, for the next round. Over rounds the
        server receives the whole of the site's deltas, only later, instead of losing each round's tail.
        The residual is computed from the trained weights only (post-processing of the DP-SGD release), so
        it spends no ε; it never leaves the site except as part of a later upload."""
        if not fit.extra.get("error_feedback", False):
            return strategy.encode_update(delta, fit)
        state = SiteState(RunLayout(cfg.run_dir).site(site).state)
        used = state.residual_for(r)
        if used and set(used) != set(delta):
            raise FedpathError(f"{state.residual_path}: residual tensors differ from the model's; delete it")
        payload, _, left = compress_with_feedback(delta, used, lambda full: strategy.encode_update(full, fit))
        start = {k: used[k].to(torch.float32) if k in used else torch.zeros_like(v) for k, v in left.items()}
        state.save_residual(r, start, left)
        return payload

    def fetch_global(self, client: SiteClient, cfg: ExperimentConfig, site: str, r: int) -> State:
        state = SiteState(RunLayout(cfg.run_dir).site(site).state)
        kept = state.load_global()
        if kept is not None and kept[0] == r - 1:
            payload = client.download_delta(r)
            if payload is not None:
                prev = kept[1]
                try:
                    new = {k: apply_delta(v, decompress_one(payload, k, tuple(v.shape))) for k, v in prev.items()}
                except KeyError as exc:
                    raise FedpathError(f"global delta version {r}: tensor {exc} missing") from None
                want = client.last_delta_digest
                if want is None or state_digest(new) == want:
                    state.save_global(r, new)
                    return new
                log.warning("site %s: version %d rebuilt from its delta differs from the server's; full download", site, r)
        from federation.site import PlainSite

        g = PlainSite().fetch_global(client, cfg, site, r)
        state.save_global(r, g)
        return g

    def train(self, cfg: ExperimentConfig, site: str, r: int, global_state: State, fit: FitConfig) -> TrainResult:
        from pipeline.train import job_checkpoint, train_local

        layout = RunLayout(cfg.run_dir).site(site)
        state = SiteState(layout.state)
        hooks = MutualHooks(cfg, fit, state)
        result = train_local(
            cfg,
            [site],
            cfg.run_dir,
            init_state={k: v.clone() for k, v in global_state.items()},
            round_index=r,
            job_id=f"round-{r}",
            progress=False,
            hooks=hooks,
        )
        assert hooks.pair is not None
        personal = {k: v.detach().cpu().clone() for k, v in hooks.pair.state_dict().items() if not k.startswith("student.")}
        # the site's own student after this round's local DP-SGD steps, before averaging (``local``): the
        # iterate whose delta the upload compresses, so keeping it releases nothing new and spends no ε
        personal |= {f"local.{k}": v.detach().cpu().clone() for k, v in hooks.pair.student.state_dict().items()}
        ck = job_checkpoint(layout.round(r))
        opt = None
        if ck is not None:
            import json

            opt = (load_file(str(ck / "optimizer.safetensors")), json.loads((ck / "optimizer.json").read_text()))
        state.save_personal(r, personal, opt)
        result.extra["personal_state"] = str(state.personal_path)
        # the best teacher so far on the site's own validation split is the personal model (personal_select):
        # the next round still trains on from this round's teacher, so the choice never reaches the student
        score = result.metrics.get("val_teacher_dice")
        if score is not None:
            teacher = {k: v for k, v in personal.items() if k.startswith("teacher.")}
            result.extra["personal_best"] = state.offer_best(r, teacher, float(score))
        return result
