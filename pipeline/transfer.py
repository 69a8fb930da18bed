"""Server-side knowledge transfer without site data (issue 16): masked-image-modelling pretraining of a
segmentation network on unlabelled tiles, a fresh task head for a site, and FedDF-style distillation of an
ensemble of site models into one universal model.

Only the server runs these, on tiles it holds (public slides tiled through the normal path, or
fedpath's synthetic slides): no site pixel is touched, so none of this spends a site's privacy budget.
The site models it distils are already DP outputs (post-processing).

* :func:`mim_pretrain`: SimMIM-style pretraining. Random square patches of each tile are replaced by a
  learned-free fill (the tile's mean colour) and the network, built with a 3-channel output head,
  regresses the original pixels; the L1 loss counts only masked pixels, so copying the input earns
  nothing. GroupNorm everywhere, so nothing needs re-aligning afterwards (the seed paper re-aligns
  BatchNorm statistics).
* :func:`with_fresh_head`: the pretrained body with a new, randomly initialised output head for a task's
  number of classes. Head tensors are found by building the architecture twice with different class
  counts (whatever changes shape is the head), so it works for every network ``build_model`` makes.
  :func:`fresh_head` is a head alone, deterministic from the architecture and the class count: what the
  aggregator's ``/v1/model/task`` serves to a site with its own label set.
* :func:`distil_ensemble`: the student minimises the per-pixel KL divergence to the ensemble's averaged
  softened logits (FedDF, Lin et al. 2020), on unlabelled tiles; teachers may be weighted (e.g. by their
  sites' tile counts).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pipeline.config import ModelConfig
from pipeline.errors import FedpathError
from pipeline.models import build_model

log = logging.getLogger(__name__)


class UnlabelledTiles(Dataset[torch.Tensor]):
    """The tiles of some (or all) slides of one store, without masks: ``float32 (3,H,W)`` in [0, 1].

    Slides without annotations (public whole slides) are fine here. Random flips and 90° turns are
    applied when ``augment`` is set.
    """

    def __init__(self, store_path: Path | str, slide_ids: Sequence[str] | None = None, augment: bool = True, seed: int = 0) -> None:
        from wsi.store import SiteStore

        self.store_path = Path(store_path)
        store = SiteStore(self.store_path)
        if not store.exists():
            raise FedpathError(f"{self.store_path}: no tile store (tile the server's slides first)")
        ids = list(slide_ids) if slide_ids is not None else list(store.slides())
        self.images = []
        for sid in ids:
            n = store.n_tiles(sid)
            if n:
                self.images.append(np.asarray(store.images(sid)[:]))
        if not self.images:
            raise FedpathError(f"{self.store_path}: no tissue tiles in slides {ids}")
        self.images_all = np.concatenate(self.images)
        self.augment = augment
        self.seed = seed

    def __len__(self) -> int:
        return len(self.images_all)

    def __getitem__(self, item: int) -> torch.Tensor:
        img = self.images_all[item].astype(np.float32) / 255.0
        if self.augment:
            rng = np.random.default_rng([self.seed, item, int(torch.randint(0, 2**31 - 1, ()).item())])
            img = np.rot90(img, int(rng.integers(4)))
            if rng.random() < 0.5:
                img = img[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


def _batches(ds: Dataset[torch.Tensor], batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    while True:
        dl = DataLoader(ds, batch_size=batch_size, shuffle=True, drop_last=len(ds) >= batch_size, generator=g)  # type: ignore[arg-type]
        yield from dl


def patch_mask(shape: tuple[int, int, int], patch: int, ratio: float, gen: torch.Generator) -> torch.Tensor:
    """``(B,1,H,W)`` float mask, 1 where a ``patch``×``patch`` cell is hidden (``ratio`` of the cells)."""
    b, h, w = shape
    gh, gw = math.ceil(h / patch), math.ceil(w / patch)
    cells = torch.rand((b, 1, gh, gw), generator=gen) < ratio
    m = cells.repeat_interleave(patch, 2).repeat_interleave(patch, 3)[:, :, :h, :w]
    return m.float()


@dataclass
class PretrainResult:
    state: dict[str, torch.Tensor]
    model: ModelConfig
    losses: list[float] = field(default_factory=list)
    mean_fill_l1: float = float("nan")


def mim_pretrain(
    model_cfg: ModelConfig,
    tiles: Dataset[torch.Tensor],
    steps: int,
    batch_size: int = 16,
    lr: float = 2e-3,
    mask_ratio: float = 0.5,
    patch: int = 8,
    seed: int = 0,
    init: dict[str, torch.Tensor] | None = None,
) -> PretrainResult:
    """Masked image modelling: train the network (3-channel output) to restore hidden patches.

    ``mean_fill_l1`` is the masked-pixel L1 of the trivial restorer (each tile's mean colour), measured
    on the same batches: the pretrained network must beat it to have learnt anything about tissue.
    """
    if steps < 1:
        raise FedpathError(f"mim_pretrain: steps must be ≥ 1, got {steps}")
    torch.manual_seed(seed)
    rec_cfg = model_cfg.model_copy(update={"out_channels": model_cfg.in_channels})
    net = build_model(rec_cfg)
    if init is not None:
        net.load_state_dict(init, strict=False)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed + 1)
    losses: list[float] = []
    base: list[float] = []
    batches = _batches(tiles, batch_size, seed)
    net.train()
    for _ in range(steps):
        x = next(batches)
        m = patch_mask((x.shape[0], x.shape[2], x.shape[3]), patch, mask_ratio, gen)
        fill = x.mean(dim=(2, 3), keepdim=True)
        x_in = x * (1 - m) + fill * m
        out = torch.sigmoid(net(x_in))
        denom = m.sum() * x.shape[1] + 1e-6
        loss = ((out - x).abs() * m).sum() / denom
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        base.append(float(((fill - x).abs() * m).sum() / denom))
    tail = max(1, steps // 5)
    log.info("mim_pretrain: %d steps, masked L1 %.4f (last %d steps) vs mean fill %.4f", steps, float(np.mean(losses[-tail:])), tail, float(np.mean(base[-tail:])))
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    return PretrainResult(state=state, model=rec_cfg, losses=losses, mean_fill_l1=float(np.mean(base[-tail:])))


def head_keys(model_cfg: ModelConfig) -> set[str]:
    """The state-dict keys of the output head: those whose shape depends on ``out_channels``.

    Both networks are built on the ``meta`` device: shapes only, no memory and no draw from torch's RNG.
    """
    with torch.device("meta"):
        a = build_model(model_cfg.model_copy(update={"out_channels": 2})).state_dict()
        b = build_model(model_cfg.model_copy(update={"out_channels": 5})).state_dict()
    return {k for k in a if a[k].shape != b[k].shape}


def head_seed(model_cfg: ModelConfig) -> int:
    """The seed of a fresh head: a hash of the architecture and its class count, public values only."""
    digest = hashlib.sha256(b"fedpath-head\0" + model_cfg.model_dump_json().encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def fresh_head(model_cfg: ModelConfig, classes: int | None = None) -> dict[str, torch.Tensor]:
    """A newly initialised output head for ``classes`` (default: ``model_cfg.out_channels``) classes.

    Deterministic from public values: every caller asking for the same architecture and class count
    gets the same tensors, bit for bit (the draws come from a private generator seeded by
    :func:`head_seed`, so torch's global RNG is neither used nor disturbed). Cheap: the network is built
    on the ``meta`` device and only the head's tensors are allocated. The initialisation is PyTorch's
    default for each layer: convolutions and linear layers U(±1/sqrt(fan_in)) for weight and bias, norm
    layers weight 1 and bias 0, PReLU 0.25.
    """
    cfg = model_cfg if classes is None else model_cfg.model_copy(update={"out_channels": int(classes)})
    keys = sorted(head_keys(cfg))
    with torch.device("meta"):
        net = build_model(cfg)
    modules = dict(net.named_modules())
    gen = torch.Generator().manual_seed(head_seed(cfg))
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        owner, _, pname = key.rpartition(".")
        mod = modules[owner]
        like = getattr(mod, pname)
        if isinstance(mod, nn.modules.conv._ConvNd | nn.Linear):
            w = mod.weight
            fan_in = int(w.shape[1]) * math.prod(int(d) for d in w.shape[2:])
            bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            t = (torch.rand(tuple(like.shape), generator=gen, dtype=torch.float64) * 2 - 1) * bound
        elif isinstance(mod, nn.GroupNorm | nn.LayerNorm | nn.modules.batchnorm._NormBase):
            t = torch.ones(tuple(like.shape)) if pname == "weight" else torch.zeros(tuple(like.shape))
        elif isinstance(mod, nn.PReLU):
            t = torch.full(tuple(like.shape), 0.25)
        else:
            raise FedpathError(f"fresh_head: no initialisation for head tensor {key!r} ({type(mod).__name__})")
        out[key] = t.to(like.dtype)
    return out


def with_fresh_head(pretrained: dict[str, torch.Tensor], model_cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """The pretrained body and a newly initialised head for ``model_cfg.out_channels`` classes."""
    torch.manual_seed(seed)
    target = build_model(model_cfg).state_dict()
    heads = head_keys(model_cfg)
    out: dict[str, torch.Tensor] = {}
    for k, v in target.items():
        if k in heads:
            out[k] = v.clone()
            continue
        if k not in pretrained or pretrained[k].shape != v.shape:
            raise FedpathError(f"with_fresh_head: pretrained weights lack {k!r} {tuple(v.shape)} (a different architecture?)")
        out[k] = pretrained[k].clone()
    return out


def ensemble_logits(teachers: Sequence[nn.Module], x: torch.Tensor, weights: Sequence[float] | None = None) -> torch.Tensor:
    w = torch.tensor(weights if weights is not None else [1.0] * len(teachers), dtype=torch.float32)
    w = w / w.sum()
    with torch.no_grad():
        return sum(wi * t(x) for wi, t in zip(w, teachers, strict=True))  # type: ignore[return-value]


def distil_ensemble(
    teachers: Sequence[nn.Module],
    student: nn.Module,
    tiles: Dataset[torch.Tensor],
    steps: int,
    batch_size: int = 16,
    lr: float = 1e-3,
    temperature: float = 2.0,
    weights: Sequence[float] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """FedDF: fit ``student`` to the teachers' averaged logits on unlabelled tiles (per-pixel KL at
    ``temperature``, scaled by T² as in Hinton et al.). Returns the loss history and the final
    pixel agreement between student and ensemble (argmax), measured on fresh batches."""
    if not teachers:
        raise FedpathError("distil_ensemble: no teacher models")
    for t in teachers:
        t.eval()
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    batches = _batches(tiles, batch_size, seed)
    losses: list[float] = []
    student.train()
    for _ in range(steps):
        x = next(batches)
        target = F.softmax(ensemble_logits(teachers, x, weights) / temperature, dim=1)
        logp = F.log_softmax(student(x) / temperature, dim=1)
        loss = F.kl_div(logp, target, reduction="none").sum(1).mean() * temperature**2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    student.eval()
    agree, total = 0, 0
    with torch.no_grad():
        for _ in range(4):
            x = next(batches)
            a = ensemble_logits(teachers, x, weights).argmax(1)
            agree += int((student(x).argmax(1) == a).sum())
            total += a.numel()
    return {"losses": losses, "agreement": agree / max(total, 1), "steps": steps}
