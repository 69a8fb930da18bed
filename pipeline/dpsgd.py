"""DP-SGD's moving parts around Opacus: secure noise, secure Poisson sampling, and slide-level clipping.

fedpath builds Opacus' pieces itself (``GradSampleModule`` + a :class:`~opacus.optimizers.DPOptimizer`
subclass + its own batch samplers) instead of calling ``PrivacyEngine.make_private``: the engine would draw
noise and Poisson masks from torch's seeded Mersenne Twister (its secure mode needs ``torchcsprng``, which
has no build for the pinned torch), and fedpath's ledger, not the engine's accountant, owns ε.

* :class:`SecureDPOptimizer`: Opacus' clipping rule, with the clip and the accumulation fused into one
  matrix-vector product per parameter, and noise from a :class:`~pipeline.dprandom.NoiseSource` (a per-job
  CSPRNG).
* :class:`PoissonSampler`: each item joins a logical batch independently with probability q (Opacus'
  ``UniformWithReplacementSampler``, with the CSPRNG's coins).
* Slide-level DP (``privacy.unit: slide``): :class:`PoissonSlideSampler` samples *slides* with probability
  q and takes up to ``cap`` tiles of each; :class:`SlideDPOptimizer` averages the per-tile gradients of
  each slide and clips that mean as one unit to C, so one slide moves the summed gradient by at most C, the
  noise is σC and the accountant runs over slides with rate q. Physical batches hold whole slides only, so
  a slide's tiles are never clipped apart.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch.utils.data import Dataset, Sampler

from pipeline.dprandom import NoiseSource
from pipeline.errors import FedpathError


class SecureDPOptimizer(DPOptimizer):
    """Opacus' DPOptimizer whose Gaussian noise comes from the job's CSPRNG (never torch's global RNG).

    ``fused`` (default): :meth:`clip_and_accumulate` computes Opacus' clip factors, min(1, C / (‖g_i‖ +
    1e-6)), and then each parameter's clipped sum as one matrix-vector product, factors · (B, d) per-sample
    gradients, instead of Opacus' einsum."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, *, rng: NoiseSource, fused: bool = True, **kwargs: Any
    ) -> None:
        super().__init__(optimizer, generator=None, secure_mode=False, **kwargs)
        self.rng = rng
        self.fused = fused
        self.clip_groups: list[tuple[list[int], float]] | None = None

    def set_clip_groups(self, groups: list[tuple[list[int], float]]) -> None:
        """Clip each sample's gradient per group of parameters (indices into :attr:`params`, every one in
        exactly one group) to that group's norm C_g instead of over all of them to C. The C_g must satisfy
        Σ C_g² = C², so a sample's clipped gradient still has norm at most C and the noise σC and the
        accounting are unchanged; the groups only decide how C is shared (e.g. a shared model and a private
        one trained together)."""
        seen = sorted(i for idx, _ in groups for i in idx)
        if seen != list(range(len(self.params))):
            raise FedpathError("DP-SGD clip groups must cover every trainable parameter exactly once")
        total = sum(c * c for _, c in groups) ** 0.5
        if any(c <= 0 for _, c in groups) or abs(total - self.max_grad_norm) > 1e-6 * self.max_grad_norm:
            raise FedpathError(f"DP-SGD clip groups: the norms' root sum of squares {total:g} is not max_grad_norm {self.max_grad_norm:g}")
        if not self.fused:
            raise FedpathError("DP-SGD clip groups need the fused clip path")
        self.clip_groups = groups

    def grad_samples_in_param_dtype(self) -> None:
        """Per-sample gradients in their parameter's dtype (float32) before anything sums, clips or takes
        a norm of them: under bf16 autocast some come out in bf16, and a clip in bf16 let a sample's
        gradient reach 0.3 % above C (tests/pipeline/test_dp_clipping.py)."""
        for p in self.params:
            gs = p.grad_sample
            if isinstance(gs, torch.Tensor) and gs.dtype != p.dtype:
                p.grad_sample = gs.to(p.dtype)
            elif isinstance(gs, list):
                p.grad_sample = [g.to(p.dtype) for g in gs]

    def clip_and_accumulate(self) -> None:
        self.grad_samples_in_param_dtype()
        if not self.fused:
            super().clip_and_accumulate()
            return
        flat = []
        for p in self.params:
            _check_processed_flag(p.grad_sample)
            g = self._get_flat_grad_sample(p)
            flat.append(g.reshape(len(g), p.numel()))  # (samples, params): also for an empty batch
        groups = self.clip_groups or [(list(range(len(flat))), float(self.max_grad_norm))]
        factors = [flat[0].new_zeros((0,))] * len(flat)  # an empty Poisson batch: nothing to clip
        if len(flat[0]):
            per_param = torch.stack([torch.linalg.vector_norm(g, dim=1) for g in flat], dim=1)  # (samples, params)
            for idx, clip in groups:
                factor = (clip / (per_param[:, idx].norm(2, dim=1) + 1e-6)).clamp(max=1.0)
                for i in idx:
                    factors[i] = factor
        for p, g, factor in zip(self.params, flat, factors, strict=True):
            grad = (factor.to(g.dtype) @ g).view_as(p) if len(g) else torch.zeros_like(p)
            if p.summed_grad is not None:
                p.summed_grad += grad
            else:
                p.summed_grad = grad
            _mark_as_processed(p.grad_sample)

    def add_noise(self) -> None:
        """All parameters' noise in one draw (a few large tensor ops per step rather than ~10 small ones
        per parameter, which cost a scheduler slice each when the other core is busy), added in float64
        and rounded once to each gradient's dtype."""
        std = self.noise_multiplier * self.max_grad_norm
        sums = [p.summed_grad for p in self.params]
        for g in sums:
            _check_processed_flag(g)
        flat = torch.cat([g.reshape(-1) for g in sums])
        noisy = self.rng.add_gaussian(flat, std)
        for p, g, z in zip(self.params, sums, noisy.split([g.numel() for g in sums]), strict=True):
            p.grad = z.view_as(p)
            _mark_as_processed(g)


class SlideDPOptimizer(SecureDPOptimizer):
    """Clips each slide's mean per-tile gradient as one unit: call :meth:`set_groups` before each step."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, rng: NoiseSource, **kwargs: Any) -> None:
        super().__init__(optimizer, rng=rng, **kwargs)
        self._groups: torch.Tensor | None = None

    def set_clip_groups(self, groups: list[tuple[list[int], float]]) -> None:
        raise FedpathError("slide-level DP-SGD clips each slide over all parameters; clip groups are per tile only")

    def set_groups(self, groups: torch.Tensor) -> None:
        """The slide of every row of the coming physical batch (any labels; rows of one slide share one)."""
        self._groups = groups.to(torch.int64)

    def clip_and_accumulate(self) -> None:
        if self._groups is None:
            raise FedpathError("slide-level DP-SGD: the physical batch's slide ids were not set")
        _, inverse, counts = torch.unique(self._groups, return_inverse=True, return_counts=True)
        self.grad_samples_in_param_dtype()  # a slide's mean in float32 under bf16 autocast
        for p in self.params:
            gs = self._get_flat_grad_sample(p)
            if gs.shape[0] != inverse.shape[0]:
                raise FedpathError(
                    f"slide-level DP-SGD: {gs.shape[0]} per-sample gradients for {inverse.shape[0]} slide ids"
                )
            red = gs.new_zeros((len(counts), *gs.shape[1:])).index_add_(0, inverse, gs)
            red /= counts.to(gs.dtype).view(-1, *([1] * (gs.dim() - 1)))
            p.grad_sample = red  # one row per slide: Opacus clips rows
        self._groups = None
        super().clip_and_accumulate()


class PoissonSampler(Sampler[list[int]]):
    """``steps`` logical batches; each of ``n`` items joins each independently with probability ``q``."""

    def __init__(self, n: int, sample_rate: float, steps: int, rng: NoiseSource) -> None:
        self.n, self.sample_rate, self.steps, self.rng = n, sample_rate, steps, rng

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            yield [int(i) for i in np.flatnonzero(self.rng.bernoulli(self.n, self.sample_rate))]


class PoissonSlideSampler(Sampler[list[int]]):
    """Slide-level batches: each slide joins with probability ``q`` and brings ``cap`` of its tiles (drawn
    afresh). Yields *physical* batches of whole slides (at most ``physical`` tiles each) and tells the
    optimizer which one ends the logical batch, as Opacus' ``BatchSplittingSampler`` does."""

    def __init__(
        self,
        slide_items: Sequence[Sequence[int]],
        sample_rate: float,
        cap: int,
        steps: int,
        physical: int,
        rng: NoiseSource,
        optimizer: DPOptimizer | None = None,
    ) -> None:
        if cap > physical:
            raise FedpathError(
                f"slide-level DP: train.privacy.max_tiles_per_slide={cap} exceeds train.physical_batch_size="
                f"{physical}; a slide's tiles must fit one physical batch to be clipped as one unit"
            )
        self.slide_items = [np.asarray(v, dtype=np.int64) for v in slide_items]
        self.sample_rate, self.cap, self.steps, self.physical = sample_rate, cap, steps, physical
        self.rng, self.optimizer = rng, optimizer

    def __len__(self) -> int:
        return self.steps

    def logical_batches(self) -> Iterator[list[list[int]]]:
        """Per step: the sampled slides, each as the list of its drawn tiles."""
        for _ in range(self.steps):
            chosen = np.flatnonzero(self.rng.bernoulli(len(self.slide_items), self.sample_rate))
            yield [self.rng.subset(self.slide_items[i], self.cap) for i in chosen]

    def __iter__(self) -> Iterator[list[int]]:
        for slides in self.logical_batches():
            chunks: list[list[int]] = [[]]
            for tiles in slides:
                if chunks[-1] and len(chunks[-1]) + len(tiles) > self.physical:
                    chunks.append([])
                chunks[-1].extend(tiles)
            for k, chunk in enumerate(chunks):
                if self.optimizer is not None:
                    self.optimizer.signal_skip_step(do_skip=k < len(chunks) - 1)
                yield chunk


class WithSlideIds(Dataset[Any]):
    """A tile dataset whose items also carry their slide's index (for :class:`SlideDPOptimizer`)."""

    def __init__(self, dataset: Dataset[Any], slide_of_item: np.ndarray) -> None:
        self.dataset, self.slide_of_item = dataset, slide_of_item

    def __len__(self) -> int:
        return len(self.slide_of_item)

    def __getitem__(self, i: int) -> Any:
        x, y = self.dataset[i]
        return x, y, int(self.slide_of_item[i])


def collate_or_none(batch: list[Any]) -> Any:
    """Default collation, or ``None`` for an empty Poisson batch (a noise-only step)."""
    return torch.utils.data.default_collate(batch) if batch else None


def _input_requires_grad(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Make the image batch require a gradient. Opacus' full backward hooks then always see an input
    gradient (torch otherwise warns at the first layer), and :func:`pipeline.models.per_sample_only` skips
    the first convolution's summed weight gradient too, computing its input gradient instead: the same cost,
    and no warning that a user could not act on."""
    return tuple(
        a.detach().requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
        for a in args
    )


def make_private(
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: float,
    rng: NoiseSource,
    slide_level: bool = False,
    fused: bool = True,
) -> tuple[torch.nn.Module, SecureDPOptimizer]:
    """Wrap ``net`` for per-sample gradients and ``optimizer`` for clipping and secure noise.

    The model is checked first (:func:`pipeline.models.check_dp_model` says why one is refused), fedpath's
    fast grouped-convolution per-sample gradients are registered, and the summed convolution weight
    gradients DP-SGD throws away are skipped. ``expected_batch_size`` is q·n (tiles, or slides when
    ``slide_level``): Opacus divides the noisy sum by it. ``fused`` (default) uses the fused
    clip-and-accumulate; ``False`` keeps Opacus' own (for comparison).
    """
    from opacus import GradSampleModule

    from pipeline.models import check_dp_model, per_sample_only, register_fast_grad_samplers

    check_dp_model(net)
    register_fast_grad_samplers()
    per_sample_only(net)  # before Opacus' hooks: hook order matters
    model = GradSampleModule(net, batch_first=True, loss_reduction="mean")
    model.forbid_grad_accumulation()
    model.register_forward_pre_hook(_input_requires_grad)
    cls = SlideDPOptimizer if slide_level else SecureDPOptimizer
    dp_opt = cls(
        optimizer,
        rng=rng,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,  # type: ignore[arg-type]
        loss_reduction="mean",
        fused=fused,
    )
    return model, dp_opt
