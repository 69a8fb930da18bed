"""One-shot merging of data vectors (Tian et al., arXiv 2408.13038; task arithmetic, Ilharco et al. 2023).

A site fine-tunes the published pretrained model θ_pre on its own tiles and sends its *data vector*
τ_i = θ_i − θ_pre once. The server's model is θ_pre + λ·Σ τ_i over the vectors received so far:

* ``sum``: λ = 1, the seed paper's choice;
* ``mean``: λ = 1/n, i.e. FedAvg of one long local epoch (equal weights);
* a λ chosen on server-held validation data (:func:`tune_lambda`) when the server has some.

The control the seed paper runs is :func:`random_vectors_like`: random directions with each real
vector's per-tensor norms. If merging those does as well, the vectors carried no information.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from pipeline.errors import FedpathError

State = Mapping[str, torch.Tensor]


def _float_keys(state: State) -> list[str]:
    return [k for k, v in state.items() if v.is_floating_point()]


def data_vector(tuned: State, pre: State) -> dict[str, torch.Tensor]:
    """τ = θ_tuned − θ_pre over the floating-point tensors (integer buffers are not merged)."""
    if set(tuned) != set(pre):
        missing = sorted(set(pre) ^ set(tuned))[:3]
        raise FedpathError(f"data_vector: models differ in tensors {missing}")
    out = {}
    for k in _float_keys(pre):
        if tuned[k].shape != pre[k].shape:
            raise FedpathError(f"data_vector: {k!r} has shape {tuple(tuned[k].shape)}, θ_pre has {tuple(pre[k].shape)}")
        out[k] = tuned[k].detach().double() - pre[k].detach().double()
    return out


def merge(pre: State, vectors: Sequence[State], lam: float | str = "sum") -> dict[str, torch.Tensor]:
    """θ_pre + λ·Σ τ_i; ``lam`` is a number, ``"sum"`` (1) or ``"mean"`` (1/n). Sums in float64."""
    if not vectors:
        return {k: v.clone() for k, v in pre.items()}
    scale = 1.0 if lam == "sum" else 1.0 / len(vectors) if lam == "mean" else float(lam)
    out: dict[str, torch.Tensor] = {}
    for k, v in pre.items():
        if not v.is_floating_point():
            out[k] = v.clone()
            continue
        acc = v.detach().double().clone()
        for tau in vectors:
            if k not in tau or tau[k].shape != v.shape:
                raise FedpathError(f"merge: a data vector lacks {k!r} or has the wrong shape")
            acc += scale * tau[k].double()
        out[k] = acc.to(v.dtype)
    return out


def tune_lambda(
    pre: State,
    vectors: Sequence[State],
    score: Callable[[dict[str, torch.Tensor]], float],
    grid: Sequence[float] | None = None,
    n: int | None = None,
) -> tuple[float, dict[float, float]]:
    """The λ on ``grid`` (default: 1/n … 1.5 in 8 steps, plus 1/n and 1) maximising ``score`` of the merged
    model on the server's own validation data. Returns (best λ, every λ's score). ``n``: how many vectors
    ``vectors`` holds when it is their sum (default ``len(vectors)``)."""
    n = max(n or len(vectors), 1)
    lams = sorted(set(grid if grid is not None else [*torch.linspace(1 / n, 1.5, 8).tolist(), 1 / n, 1.0]))
    scores = {float(lam): float(score(merge(pre, vectors, float(lam)))) for lam in lams}
    best = max(scores, key=lambda k: scores[k])
    return best, scores


def random_vectors_like(vectors: Sequence[State], seed: int) -> list[dict[str, torch.Tensor]]:
    """The control: for each data vector, Gaussian directions rescaled to each tensor's norm."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for tau in vectors:
        r = {}
        for k, v in tau.items():
            d = torch.randn(v.shape, generator=g, dtype=torch.float64)
            n = float(d.norm())
            r[k] = d * (float(v.double().norm()) / n) if n > 0 else d
        out.append(r)
    return out


def validation_dice(builder: Callable[[], torch.nn.Module], state: State, store: Path) -> float:
    """Mean Dice of the model ``state`` on every labelled tile of ``store`` (the server's validation set)."""
    from pipeline.evaluate import evaluate_store

    net = builder()
    net.load_state_dict(state)
    dice = evaluate_store(net, store, {"train", "val", "test"}).get("dice")
    if dice is None:
        raise ValueError(f"{store}: no labelled tiles to validate on")
    return float(dice)
