"""Typed experiment configuration.

One YAML file drives a whole run; every section is a pydantic model that forbids unknown keys, so a typo
is an error naming the key instead of a silently ignored setting. CLI flags override individual fields
through :func:`apply_overrides` (dotted paths, e.g. ``train.epochs=3``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from fedcore.layout import RunLayout
from wsi.config import SynthConfig, TilingConfig, TissueConfig, _Strict


class ConfigError(ValueError):
    """A config file that cannot be used; the message is one line naming the file and the key."""


#: what a site name may be: it becomes a directory name, a file name and an HTTP header value
SITE_NAME_PATTERN = "[a-z0-9_-]{1,64}"
_SITE_NAME_RE = re.compile(SITE_NAME_PATTERN)


def is_site_name(name: object) -> bool:
    """Whether ``name`` is a valid site name (lowercase letters, digits, ``_`` and ``-``; 1-64 chars)."""
    return isinstance(name, str) and _SITE_NAME_RE.fullmatch(name) is not None


def check_site_name(name: object, what: str = "site name") -> str:
    """``name`` if it is a valid site name, else a :class:`ConfigError` saying which rule it breaks.

    Site names become path components (``sites/<site>/``, ``updates/<r>/<site>.safetensors``), so one
    that is not a plain name could escape the run directory or collide after a restart.
    """
    if not is_site_name(name):
        shown = repr(name)[:80]
        raise ConfigError(f"{what} {shown}: must match {SITE_NAME_PATTERN} (lowercase letters, digits, _ and -)")
    return str(name)


class SiteConfig(_Strict):
    """One institution: its name and the manifest that lists its slides."""

    name: str
    manifest: Path

    @field_validator("name")
    @classmethod
    def _valid_name(cls, v: str) -> str:
        return check_site_name(v)


class ModelConfig(_Strict):
    """A MONAI segmentation network built DP-ready (GroupNorm, no in-place activations)."""

    name: Literal["unet", "basicunet", "segresnet", "attentionunet", "ensemble"] = "unet"
    in_channels: int = 3
    out_channels: int = 2
    channels: list[int] = Field(default_factory=lambda: [16, 32, 64, 128])
    strides: list[int] = Field(default_factory=lambda: [2, 2, 2])
    num_res_units: int = 1
    groups: int = Field(8, ge=1, description="GroupNorm groups")
    dropout: float = Field(0.0, ge=0, lt=1)
    upsample: Literal["deconv", "nontrainable"] = Field(
        "deconv",
        description="decoder upsampling: MONAI's transposed conv (fastest, per-sample code registered by "
        "pipeline.models) or nearest resize + conv",
    )
    members: list[ModelConfig] = Field(
        default_factory=list,
        description="ensemble only: the networks whose logits are averaged (e.g. a FedMIC site's teacher and "
        "the global student); an inference model, never trained as one",
    )

    @model_validator(mode="after")
    def _ensemble_members(self) -> ModelConfig:
        if self.name == "ensemble":
            if len(self.members) < 2 or any(m.name == "ensemble" for m in self.members):
                raise ValueError("an ensemble needs two or more member networks, none itself an ensemble")
            if any(m.out_channels != self.out_channels for m in self.members):
                raise ValueError("every ensemble member must have the ensemble's out_channels")
        elif self.members:
            raise ValueError(f"model {self.name!r}: members are for name: ensemble")
        return self


class StainConfig(_Strict):
    method: Literal["none", "macenko", "reinhard"] = "none"
    reference_tiles: int = Field(64, ge=1)


class AugmentConfig(_Strict):
    flips: bool = True
    rot90: bool = True
    hed_jitter: float = Field(0.03, ge=0, description="std of the HED-space stain perturbation")
    brightness: float = Field(0.1, ge=0)
    scale: float = Field(
        0.0, ge=0, le=0.7,
        description="random zoom of each training tile by exp(U(-scale, scale)) about its centre (image "
        "bilinear, mask nearest, mirrored at the edges): nuclei sizes vary between organs and scanners",
    )


class PrivacyConfig(_Strict):
    """Sample-level DP-SGD (Opacus) and the site's budget."""

    enabled: bool = True
    target_epsilon: float | None = Field(
        8.0, gt=0, description="ε over the whole planned training; null: use noise_multiplier"
    )
    noise_multiplier: float | None = Field(None, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    delta: float | None = Field(None, gt=0, lt=1, description="default: 1 / (10 * training tiles)")
    accountant: Literal["prv", "rdp"] = "prv"
    budget_epsilon: Annotated[float, Field(gt=0)] | Literal["unlimited"] | None = Field(
        None,
        description="refuse a job that would spend past this ε (default: target_epsilon); 'unlimited' runs "
        "a fixed noise multiplier without a budget, and the report says so",
    )
    unit: Literal["tile", "slide"] = Field(
        "tile",
        description="tile: DP-SGD per tile (slide-level figures only where group privacy means something); "
        "slide: slides are Poisson-sampled and each slide's gradient is clipped as one unit",
    )
    max_tiles_per_slide: int | None = Field(
        None,
        ge=1,
        description="slide unit: tiles each sampled slide contributes (<= physical_batch_size; default: "
        "min(largest slide, physical_batch_size))",
    )
    augment_multiplicity: int = Field(
        1,
        ge=1,
        le=16,
        description="each sampled tile's gradient is the mean over this many independent augmentations of it, "
        "taken before clipping (augmentation multiplicity, De et al. 2022): the tile is still one unit, so ε is "
        "unchanged; costs this many forward/backward passes per tile",
    )
    reproducible_noise: bool = Field(
        False,
        description="DEBUG ONLY: DP noise and sampling from the config seed instead of the OS-entropy CSPRNG; "
        "the site is marked NOT PRIVATE for good and no ε of it is printed as a guarantee",
    )


class TrainConfig(_Strict):
    batch_size: int = Field(16, ge=1, description="logical batch size (a privacy parameter)")
    physical_batch_size: int = Field(8, ge=1, description="memory bound per forward pass (virtual batches)")
    epochs: float = Field(1.0, gt=0, description="local epochs per job or per federation round")
    max_steps: int | None = Field(None, ge=1, description="caps optimizer steps per job or per round")
    precision: Literal["float32", "bfloat16", "auto"] = Field(
        "float32",
        description="forward/backward precision: bfloat16 CPU autocast (auto: where the CPU has native bf16, "
        "1.6x faster steps there); weights, optimizer state and DP clipping stay float32",
    )
    lr: float = Field(1e-3, gt=0)
    optimizer: Literal["adam", "sgd"] = "adam"
    weight_decay: float = Field(0.0, ge=0)
    ema_decay: float | None = Field(
        None, gt=0, lt=1,
        description="keep an exponential moving average of the weights (torch's AveragedModel), updated after "
        "every step; validation, early stopping, checkpoints and the job's result use the average. Under DP-SGD "
        "it is post-processing of the noisy iterates (no ε)",
    )  # fmt: skip
    val_fraction: float = Field(
        0.2, ge=0, lt=1, description="share of slides (not tiles) held out for validation"
    )
    num_workers: int = Field(0, ge=0)
    seed: int = 0
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: all cores)")
    checkpoint_every: int = Field(20, ge=1, description="optimizer steps between resumable checkpoints")
    max_val_tiles: int | None = Field(None, ge=1, description="cap on validation tiles (evenly spread)")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="cosine: decay from lr to lr_min over the whole training (every round)"
    )
    lr_min: float = Field(0.0, ge=0, description="final learning rate of the cosine schedule")
    val_every: int | None = Field(
        None, ge=1, description="steps between validation Dice checks (early stopping; keeps the best model)"
    )
    patience: int = Field(3, ge=1, description="validation checks without improvement before stopping")
    early_stop_start: float = Field(
        0.0, ge=0, le=1,
        description="share of the job's planned steps before which a check without improvement does not count "
        "towards patience (the best model is still kept): with a cosine schedule the validation Dice of the "
        "early, high-LR steps is noisy and still rising",
    )
    stain: StainConfig = StainConfig()
    augment: AugmentConfig = AugmentConfig()
    privacy: PrivacyConfig = PrivacyConfig()


class UpdateDPConfig(_Strict):
    """Update-level DP: clip a model update to clip_norm and add N(0, (noise_multiplier*clip_norm)^2)."""

    mode: Literal["none", "local", "central"] = "none"
    clip_norm: float = Field(1.0, gt=0)
    noise_multiplier: float = Field(0.0, ge=0)
    delta: float = Field(1e-5, gt=0, lt=1)


class FederationConfig(_Strict):
    strategy: str | dict[str, Any] = Field(
        "fedavg",
        description="a strategy name (its options from the flat keys below, e.g. proximal_mu), or a mapping "
        "{name: fedmic, energy_start: 0.9, ...} validated by federation.strategies.registry",
    )
    rounds: int = Field(3, ge=1)
    min_sites: int = Field(2, ge=1, description="k of n: the fewest reports a round may close with")
    close_policy: Literal["all_or_deadline", "min_sites"] = Field(
        "all_or_deadline",
        description="all_or_deadline: close when every provisioned site reported, or at the deadline with "
        ">= min_sites; min_sites: close as soon as min_sites reported",
    )
    round_deadline_s: float = Field(3600.0, gt=0, description="seconds after a round opens")
    late_updates: Literal["reject", "next_round"] = Field(
        "reject", description="an update for an already closed round: refuse it, or count it in the open round"
    )
    proximal_mu: float = Field(0.01, ge=0)
    server_lr: float = Field(0.01, gt=0)
    server_beta1: float = Field(0.9, ge=0, lt=1)
    server_beta2: float = Field(0.99, ge=0, lt=1)
    server_tau: float = Field(1e-3, gt=0)
    update_dp: UpdateDPConfig = UpdateDPConfig()
    trim_fraction: float = Field(
        0.2, ge=0, lt=0.5, description="fedtrimmedavg: share of updates cut at each end, per coordinate"
    )
    max_update_norm: float | None = Field(
        None, gt=0, description="reject updates whose L2 norm exceeds this (default: max_update_rms * sqrt(params))"
    )
    max_update_rms: float = Field(
        1.0, gt=0, description="default norm bound: largest root-mean-square change per model parameter"
    )
    max_n_tiles: int = Field(
        1_000_000, ge=1, description="largest n_tiles (the FedAvg weight) a site may report; larger is refused"
    )
    max_classes: int = Field(
        256, ge=1, le=65536,
        description="largest class count a site may ask /v1/model/task for (a head's size grows with it)",
    )
    max_body_mb: float | None = Field(
        None, gt=0, description="upload size limit (default: the model's size plus a small header allowance)"
    )
    insecure: bool = Field(
        False, description="allow tokens over plain HTTP to a non-loopback host, and serving without TLS on one"
    )
    api_docs: bool = Field(False, description="serve /docs and /openapi.json")
    header_timeout_s: float = Field(10.0, gt=0, description="a connection must send a request head within this")
    keep_alive_s: float = Field(5.0, gt=0, description="idle keep-alive connections are closed after this")
    body_idle_timeout_s: float = Field(30.0, gt=0, description="an upload that sends nothing for this is dropped")
    upload_timeout_s: float = Field(900.0, gt=0, description="longest time one upload may take")
    max_concurrent_uploads: int = Field(32, ge=1, description="uploads received at once; more get 503 + Retry-After")
    max_connections: int = Field(1024, ge=1, description="open connections served at once; more get 503")
    unauth_burst: int = Field(20, ge=1, description="failed authentications per client address before 429")
    unauth_per_s: float = Field(1.0, gt=0, description="refill rate of that allowance")
    audit_unauth_window_s: float = Field(
        60.0, gt=0, description="failed authentications are counted and summarised once per window"
    )
    host: str = "127.0.0.1"
    port: int = Field(8443, ge=0, le=65535)
    server_url: str | None = Field(
        None, description="https://host:port the sites talk to (default from host/port)"
    )
    tls: bool = True
    ca_cert: Path | None = None
    token_file: Path | None = Field(
        None, description="a site's token file (default: <run>/provision/sites/<site>/token)"
    )
    seed: int = Field(0, description="seed of the initial global model (round_0)")
    server_manifest: Path | None = Field(
        None, description="unlabelled or public tiles the server holds (for strategies that distil on it)"
    )
    server_val_manifest: Path | None = Field(
        None,
        description="labelled slides the server holds for validation (masks or annotations; e.g. fedpath's "
        "synthetic slides, never a site's): data vectors choose λ on them (lam: tuned)",
    )
    initial_model: Path | None = Field(
        None,
        description="version 0 from this model file (e.g. θ_pre of `fedpath pretrain`, "
        "<run>/server/pretrained.safetensors) instead of a seeded random init",
    )
    upload_retries: int = Field(5, ge=0, description="site client: retries of a failed request")
    wait_timeout_s: float = Field(600.0, gt=0, description="site client: longest wait for a round to open")
    parallel_sites: int = Field(2, ge=1, description="simulate: site jobs run at the same time")
    site_timeout_s: float = Field(3600.0, gt=0, description="simulate: one site job's time limit")
    simulate_workers: Literal["warm", "cold"] = Field(
        "warm",
        description="simulate: run each site's round job (the same `fedpath site-round` command) in a warm "
        "per-site worker forked from a preloaded fork server (warm), or in a fresh process per job (cold)",
    )


class InferenceConfig(_Strict):
    """Slide-level inference: overlapping windows at the model's MPP, Gaussian-blended on disk."""

    tile_size: int | None = Field(
        None, ge=16, description="window size (default: the model's training tile size)"
    )
    overlap: float = Field(0.25, ge=0, lt=1, description="fraction of a window shared with its neighbour")
    batch_size: int = Field(8, ge=1)
    sigma_scale: float = Field(0.125, gt=0, description="Gaussian importance sigma, relative to the window")
    threshold: float = Field(0.5, gt=0, lt=1, description="foreground probability above which a pixel is mask")
    tta: Literal["none", "flips", "dihedral"] = Field(
        "none", description="test-time augmentation: logits averaged over 4 flips or the 8 turns and flips of "
        "each window (cost: that many passes); slides, test images and instances alike, never validation"
    )
    tissue_only: bool = Field(True, description="skip windows with no detected tissue")
    scheduler: str | None = Field(None, description="address of a dask scheduler to run blocks on")
    parallel_slides: int = Field(2, ge=1, description="slides in flight at once on a dask scheduler")
    precision: Literal["float32", "bfloat16", "auto"] = Field(
        "float32", description="network precision: bfloat16 autocast (auto: where the CPU has native bf16; held-out "
        "MoNuSeg Dice moves by 0.0002 against float32). float32 stays the default: maps reproduce across CPUs"
    )
    pyramid_levels: int | None = Field(
        None, ge=1, description="OME-Zarr levels (default: halve until the longer side <= 1024)"
    )
    block_size: int = Field(2048, ge=64, description="model pixels per inference block (unit of work)")
    chunk_size: int = Field(512, ge=64, description="zarr chunk side of the accumulator and the map")
    memory_accumulator_mb: int = Field(
        256, ge=0,
        description="canvases whose sums and weights fit in this many MiB are blended in memory; larger "
        "ones in a disk-backed zarr accumulator (memory flat in the slide size); 0: always on disk",
    )
    max_upsample: float = Field(
        1.0, ge=1.0, description="largest factor a slide may be upsampled to reach the model's MPP"
    )
    thumbnail_size: int = Field(1024, ge=64)
    geojson_object_type: Literal["detection", "annotation"] = Field(
        "annotation", description="QuPath object type of mask.geojson's regions (nuclei.geojson: detections)"
    )
    geojson_class: str = Field(
        "Nuclear region", description="QuPath class of mask.geojson's regions: merged blobs, not nuclei; "
        "one detection per nucleus is in nuclei.geojson"
    )
    geojson_simplify: float = Field(0.25, ge=0, description="polygon simplification in model pixels")
    aji_max_pixels: int = Field(
        64_000_000, ge=1, description="AJI over the whole slide up to this many model pixels, else per block"
    )
    tile_cache: int = Field(64, ge=1, description="decoded slide tiles kept in memory (tifffile reader)")
    tissue_max_side: int = Field(
        1024, ge=64, description="longest side of the tissue mask (detect_mpp is raised for larger slides)"
    )


AttackName = Literal["inverting_gradients", "dlg", "multistep"]
_ALL_ATTACKS: tuple[AttackName, ...] = ("inverting_gradients", "multistep")


class AttackConfig(_Strict):
    """The privacy audit (federation.attack): inversion of what a site uploads, over a sweep of ε.

    ``multistep`` inverts a real FedAvg round (``local_steps`` steps at ``batch_size`` tiles, run by
    fedpath's trainer); ``inverting_gradients`` and ``dlg`` invert one DP-SGD step of one tile, the
    worst-case upper bound. Tiles come from disjoint image sets: ``public_images`` (the prior),
    ``tuning_images`` (where ``tuning`` candidates are ranked) and the rest (scored)."""

    epsilons: list[float | None] = Field(
        default_factory=lambda: [None, 64.0, 16.0, 8.0, 4.0, 1.0], description="null: no DP (the control)"
    )
    tile_size: int = Field(32, ge=8, description="size of the attacked tiles (pixels)")
    target_mpp: float | None = Field(None, gt=0, description="µm/px of attacked tiles (default: tiling.target_mpp)")
    max_images: int | None = Field(None, ge=2, description="MoNuSeg source images read (default: all 30)")
    tiles_per_image: int = Field(4, ge=1, description="tiles cut from each source image")
    batch_size: int = Field(4, ge=1, description="threat model: tiles in the attacked site round")
    local_steps: int = Field(10, ge=1, description="threat model: local optimiser steps in the attacked round")
    labels_known: bool = True
    loss: Literal["dicece", "ce"] = "dicece"
    restarts: int = Field(2, ge=1)
    iterations: int = Field(600, ge=1, description="iterations of the single-step (upper bound) attacks")
    update_iterations: int = Field(200, ge=1, description="iterations of the FedAvg-round inversion")
    update_restarts: int = Field(1, ge=1)
    update_method: Literal["auto", "simulate", "direction"] = Field(
        "auto",
        description="round inversion: simulate the local steps (exact; SGD), match the update's direction "
        "(Adam: its steps are sign-like and a simulation gives the pixels no gradient), auto: by optimiser",
    )
    lr: float = Field(0.1, gt=0, description="Adam step on signed gradients, pixels in [0, 1]")
    tv_weight: float = Field(1.0, ge=0, description="total-variation prior weight (cosine cost is in [0, 2])")
    scales: list[int] = Field(
        default_factory=lambda: [2, 1], description="coarse-to-fine stages (downsampling factors)"
    )
    matching: Literal["cosine", "layerwise", "kernel"] = Field(
        "kernel",
        description="gradient-matching cost: global cosine (Geiping et al.), per tensor, or per conv kernel",
    )
    chroma_tv_weight: float = Field(
        3.0, ge=0, description="total-variation prior on the chroma (pixel minus its grey level)"
    )
    tuning: list[dict[str, Any]] = Field(
        default_factory=list,
        description="candidate overrides of the inversion settings (e.g. {tv_weight: 0.3}), ranked by SSIM "
        "on the tuning images' tiles, never on the scored ones; empty: the configured settings",
    )
    dlg_iterations: int = Field(60, ge=1, description="L-BFGS steps of DLG")
    n_targets: int = Field(2, ge=1, description="attacked site rounds (batches) per ε")
    upper_bound_targets: int = Field(2, ge=0, description="tiles attacked one at a time (upper bound) per ε")
    public_images: int = Field(8, ge=1, description="source images of the public set (the prior)")
    tuning_images: int = Field(4, ge=0, description="source images whose tiles tune the attack")
    attacks: list[AttackName] = Field(default_factory=lambda: list(_ALL_ATTACKS))
    clip: float | None = Field(None, gt=0, description="DP-SGD clipping norm (default: train.privacy)")
    dp_sample_rate: float | None = Field(
        None, gt=0, le=1, description="sampling rate for ε -> σ (default: train.batch_size / site tiles)"
    )
    dp_steps: int | None = Field(None, ge=1, description="DP steps for ε -> σ (default: the planned training)")
    dp_delta: float | None = Field(None, gt=0, lt=1, description="default: train.privacy.delta or 1/(10 N)")
    real_updates: bool = Field(True, description="also invert the updates stored under server/updates")
    real_max_updates: int = Field(2, ge=0, description="stored updates attacked (earliest rounds first)")
    real_max_images: int = Field(4, ge=1, description="cap on dummy tiles simulated per stored update")
    real_max_steps: int = Field(2, ge=1, description="cap on local steps simulated per stored update")
    real_iterations: int = Field(50, ge=1)
    threads: int | None = Field(None, ge=1, description="torch threads (default: train.threads or all)")
    seed: int = 0


def _pretrain_synth() -> SynthConfig:
    # the server's own labelled synthetic slides: the three default styles (wsi.synth.SITE_STYLES: stains,
    # nuclear sizes 2.6-4.6 µm, densities), 3 slides of 2048² px each (one for validation)
    return SynthConfig(
        sites=["a", "b", "c"], slides_per_site=3, val_slides=1, held_out_slides=0,
        width=2048, height=2048, tissue_fraction=0.6, workers=2,
    )  # fmt: skip


class SyntheticPretrainConfig(_Strict):
    """Supervised θ_pre on slides the server synthesises itself (exact nucleus masks; :mod:`wsi.synth`):
    public data, so no DP and no site's budget. Trained with ``train:``'s recipe (learning rate, batch,
    augmentation, early stopping on the synthetic validation slides) for ``steps`` steps."""

    steps: int = Field(1200, ge=1)
    synth: SynthConfig = Field(default_factory=_pretrain_synth, description="the server's synthetic slides")


class PretrainConfig(_Strict):
    """The server's θ_pre, from data only the server holds: no site's pixels, no site's privacy budget.

    - ``objective: mim`` (``<run>/server/pretrained.safetensors``): self-supervised masked image modelling
      on the server's unlabelled slides (``federation.server_manifest``), with the settings below;
    - ``objective: synthetic`` (``<run>/server/synthetic_pretrained.safetensors``): supervised segmentation
      on the server's synthetic slides (``pretrain.synthetic``), public pretraining, the usual start for
      DP-SGD.

    θ_pre is the starting model of every method that wants one (``federation.initial_model``;
    ``experiment.start: synthetic`` runs the synthetic one and starts every row from it).
    """

    objective: Literal["mim", "synthetic"] = Field("mim", description="which one `fedpath pretrain` runs")
    synthetic: SyntheticPretrainConfig = SyntheticPretrainConfig()
    steps: int = Field(400, ge=1, description="mim: steps")
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-2, gt=0)
    mask_ratio: float = Field(0.5, gt=0, lt=1, description="share of patches hidden")
    patch: int = Field(4, ge=1, description="side of a hidden square, in pixels")
    seed: int = Field(0, description="both objectives: the pretraining's seed")


class ExperimentOptions(_Strict):
    """``fedpath experiment``: which variants, how many seeds, how they are scored."""

    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, description="one table row per seed")
    epsilons: list[float] | None = Field(None, description="FedDP rows (default: inf, 8, 4, 1); .inf: clip only")
    federated: list[Literal["fedavg", "fedprox"]] = Field(
        default_factory=lambda: ["fedavg", "fedprox"]  # type: ignore[arg-type]
    )
    full_resolution: bool = Field(
        False, description="score whole test images at their own resolution, with instances (AJI, PQ)"
    )
    variants: list[Literal["local", "centralised", "federated", "feddp", "fedmic"]] = Field(
        default_factory=lambda: ["local", "centralised", "federated", "feddp", "fedmic"],  # type: ignore[arg-type]
        description="which kinds of row this invocation trains (others, e.g. in parallel, may do the rest)",
    )
    dp_batch_size: int | None = Field(
        None, ge=1, description="FedDP rows: logical batch (larger batches need less noise per sample at a fixed ε)"
    )
    dp_max_steps: int | None = Field(
        None, ge=1,
        description="FedDP rows: local steps per round (default train.max_steps); with dp_batch_size, "
        "max_steps * batch_size / dp_batch_size keeps the tiles seen, and the compute, equal",
    )
    dp_lr: float | None = Field(None, gt=0, description="FedDP rows: learning rate (default train.lr)")
    start: Literal["scratch", "synthetic"] = Field(
        "scratch",
        description="synthetic: pretrain θ_pre on the server's synthetic slides first (pretrain.synthetic) and "
        "start every row from it, the local and centralised baselines included; scratch: "
        "federation.initial_model when set, else a seeded init",
    )
    select_round: bool = Field(
        False, description="federated rows: the round whose global model has the best validation Dice"
    )
    parallel_local: int = Field(
        1, ge=1,
        description="baseline trainings (the local models and the centralised one, the longest first) run at "
        "the same time, each in its own process on train.threads // parallel_local threads (two one-thread "
        "jobs get more out of two cores than one two-thread job)",
    )
    fedmic: dict[str, Any] = Field(
        default_factory=dict,
        description="FedMIC rows: settings over the experiment's FedMIC strategy "
        "(fedpath.experiment_fedmic.FEDMIC_STRATEGY), e.g. {kd_weight: 0.25}; checked against the strategy's "
        "config before anything trains",
    )


class ExperimentConfig(_Strict):
    """A whole experiment: where things live and how each stage behaves."""

    name: str = "experiment"
    run_dir: Path = Path("runs/experiment")
    data_root: Path | None = Field(
        None, description="root of manifest paths (else --data-root or FEDPATH_DATA_ROOT)"
    )
    sites: list[SiteConfig] = Field(default_factory=list)
    synth: SynthConfig = SynthConfig()
    tiling: TilingConfig = TilingConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    federation: FederationConfig = FederationConfig()
    inference: InferenceConfig = InferenceConfig()
    attack: AttackConfig = AttackConfig()
    pretrain: PretrainConfig = PretrainConfig()
    experiment: ExperimentOptions = ExperimentOptions()

    def site(self, name: str) -> SiteConfig:
        for s in self.sites:
            if s.name == name:
                return s
        known = ", ".join(s.name for s in self.sites) or "none"
        raise ConfigError(f"site {name!r} is not in the config (known: {known})")

    def site_dir(self, name: str) -> Path:
        return RunLayout(self.run_dir).site(check_site_name(name)).root

    def store_path(self, name: str) -> Path:
        return RunLayout(self.run_dir).site(check_site_name(name)).store

    def resolved_data_root(self, override: Path | None = None) -> Path | None:
        """--data-root, then the config's data_root, then FEDPATH_DATA_ROOT."""
        if override is not None:
            return override
        if self.data_root is not None:
            return self.data_root
        env = os.environ.get("FEDPATH_DATA_ROOT")
        return Path(env) if env else None


def _format_error(path: Path | str, err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "<root>"
    kind = first["type"]
    if kind == "extra_forbidden":
        return f"{path}: unknown key '{loc}'"
    if kind == "missing":
        return f"{path}: missing key '{loc}'"
    return f"{path}: key '{loc}': {first['msg']} (got {first.get('input')!r})"


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text)


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a raw config dict."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{p}' is not a section")
        node[parts[-1]] = _parse_value(value)
    return data



def variant_config(cfg: ExperimentConfig, name: str, run_dir: Path, **changes: Any) -> ExperimentConfig:
    """``cfg`` for one variant of a run: its own ``run_dir``, ``name`` appended (if any), and ``changes`` given as
    ``section__key=value`` (validated again, so a bad value is the usual one-line config error)."""
    data = cfg.model_dump(mode="python")
    data["run_dir"] = run_dir
    data["name"] = f"{cfg.name}:{name}" if name else cfg.name
    for dotted, value in changes.items():
        node = data
        parts = dotted.split("__")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = value
    return ExperimentConfig.model_validate(data)

def load_config(path: Path | str | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load and validate an experiment YAML; relative paths in it are relative to the current directory."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{p}: not valid YAML{where}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections")
        data = loaded
    data = apply_overrides(data, overrides)
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(path or "<config>", err)) from None


__all__ = [
    "ConfigError",
    "ExperimentConfig",
    "SiteConfig",
    "SynthConfig",
    "TilingConfig",
    "TissueConfig",
    "check_site_name",
    "is_site_name",
    "load_config",
    "variant_config",
]
