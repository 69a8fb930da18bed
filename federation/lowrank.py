"""Dynamic low-rank compression of model deltas (FedKD / FedMIC): truncated SVD keeping an energy share.

Each float tensor of two or more dimensions is seen as a matrix (conv kernels ``(out, in, k, k)`` become
``(out, in*k*k)``) and sent as two factors: ``name::U`` of shape ``(m, r)`` (the left singular vectors
scaled by the singular values) and ``name::V`` of shape ``(r, n)`` (orthonormal rows), so that
``U @ V`` is the best rank-``r`` approximation and ``||U @ V||_F = ||U||_F``. The rank ``r`` is the
smallest that keeps ``energy`` of ``sum s_i^2``, capped at ``r_max = m*n // (m+n)`` (beyond that the
factors are no smaller than the matrix). Vectors and scalars (biases, norms) travel whole.

The payload declares the rank as a dimension symbol ``r:<name>`` bounded by ``[1, r_max]``, so the
server checks that ``U`` and ``V`` agree and stay in bounds before anything is multiplied.

Factors travel in float32, float16 or int8. Int8 factors carry one float32 scale per rank component
(``name::U.scale``: ``U``'s columns, ``name::V.scale``: ``V``'s rows; symmetric, max-abs / 127), so a
byte budget buys twice the rank of float16 factors; what the rounding leaves out joins the error
feedback like the truncation does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping

import torch

from federation.payloads import PayloadSpec, TensorDecl
from federation.wire import TensorSpec, dtype_code, spec_of

SEP = "::"
#: the per-component scales of int8 factors: ``name::U.scale`` (r,), ``name::V.scale`` (r,)
SCALE = ".scale"


def factored(spec: TensorSpec) -> bool:
    """Whether a tensor of this spec is sent as factors (float, 2-D or more, both sides > 1)."""
    if spec.dtype not in ("F32", "F64", "F16", "BF16") or len(spec.shape) < 2:
        return False
    m, n = spec.shape[0], math.prod(spec.shape[1:])
    return min(m, n) > 1 and max_rank(m, n) >= 1


def max_rank(m: int, n: int) -> int:
    """The largest rank worth sending: ``r (m + n) <= m n``."""
    return min(m, n, (m * n) // (m + n))


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    return shape[0], math.prod(shape[1:])


def rank_for_energy(s: torch.Tensor, energy: float, cap: int) -> int:
    """Smallest ``r`` with ``sum_{i<r} s_i^2 >= energy * sum s_i^2`` (at least 1, at most ``cap``)."""
    e = s.double().pow(2)
    total = float(e.sum())
    if total <= 0:
        return 1
    cum = torch.cumsum(e, 0) / total
    r = int(torch.searchsorted(cum, torch.tensor(energy - 1e-12, dtype=cum.dtype)).item()) + 1
    return max(1, min(r, cap, s.numel()))


def compress(
    state: Mapping[str, torch.Tensor], energy: float, factor_dtype: torch.dtype | None = None,
    rank_fraction: float = 1.0,
) -> dict[str, torch.Tensor]:
    """The low-rank payload of ``state``: factors for matrices (in ``factor_dtype``, default the tensor's),
    the tensor itself otherwise. The rank keeps ``energy`` of the squared singular values, but at most
    ``rank_fraction`` of the rank at which factors are as large as the matrix (a byte budget: under DP the
    delta's noise is full-rank, and the energy rule alone would send almost everything)."""
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1] (got {energy})")
    if not 0 < rank_fraction <= 1:
        raise ValueError(f"rank_fraction must be in (0, 1] (got {rank_fraction})")
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        spec = TensorSpec(dtype_code(t), tuple(t.shape))
        if not factored(spec):
            out[name] = t.detach().contiguous()
            continue
        m, n = matrix_shape(spec.shape)
        mat = t.detach().reshape(m, n).to(torch.float32)
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        r = rank_for_energy(s, energy, max(1, int(rank_fraction * max_rank(m, n))))
        dt = factor_dtype or t.dtype
        uf, vf = u[:, :r] * s[:r], vh[:r]
        if dt == torch.int8:
            (uq, us), (vq, vs) = _quantize(uf, 0), _quantize(vf, 1)
            out[name + SEP + "U"], out[name + SEP + "U" + SCALE] = uq, us
            out[name + SEP + "V"], out[name + SEP + "V" + SCALE] = vq, vs
            continue
        out[name + SEP + "U"] = uf.to(dt).contiguous()
        out[name + SEP + "V"] = vf.to(dt).contiguous()
    return out


def _quantize(f: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 of a factor, one float32 scale per rank component (``dim`` 0: per column of U, 1: per
    row of V): ``q * scale`` is within half a step of ``f``."""
    scale = (f.abs().amax(dim=dim) / 127.0).clamp_min(torch.finfo(torch.float32).tiny)
    shaped = scale.unsqueeze(0) if dim == 0 else scale.unsqueeze(1)
    q = torch.round(f / shaped).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.to(torch.float32).contiguous()


def _factor(payload: Mapping[str, torch.Tensor], key: str, dim: int) -> torch.Tensor:
    """A factor as float32, its int8 scales applied."""
    f = payload[key].to(torch.float32)
    scale = payload.get(key + SCALE)
    if scale is None:
        return f
    return f * (scale.to(torch.float32).unsqueeze(0) if dim == 0 else scale.to(torch.float32).unsqueeze(1))


def compress_with_feedback(
    delta: Mapping[str, torch.Tensor],
    residual: Mapping[str, torch.Tensor],
    encode: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Error feedback: ``encode`` the delta plus the residual kept from earlier rounds; returns the payload,
    what it carries (decoded) and the new residual (what it leaves out, float32), for sites and server alike."""
    full = {k: v.to(torch.float32) + residual[k].to(torch.float32) if k in residual else v for k, v in delta.items()}
    payload = encode(full)
    sent = decompress(payload, spec_of(full))
    left = {
        k: (full[k].to(torch.float32) - sent[k].to(torch.float32)).contiguous()
        for k in full
        if full[k].is_floating_point()
    }
    return payload, sent, left


def decompress_one(payload: Mapping[str, torch.Tensor], name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """One tensor rebuilt from a payload (``U @ V`` reshaped, or the tensor as sent)."""
    if name in payload:
        return payload[name]
    return (_factor(payload, name + SEP + "U", 0) @ _factor(payload, name + SEP + "V", 1)).reshape(shape)


def decompress(payload: Mapping[str, torch.Tensor], like: Mapping[str, TensorSpec]) -> dict[str, torch.Tensor]:
    return {k: decompress_one(payload, k, s.shape) for k, s in like.items()}


def iter_decompressed(
    loader: Iterator[tuple[str, torch.Tensor]],
    names: list[str],
    shapes: Mapping[str, tuple[int, ...]],
) -> Iterator[tuple[str, torch.Tensor]]:
    """Decode a stream of payload tensors (as stored: ``x`` or ``x::U`` then ``x::V``) into ``names``."""
    pending: dict[str, torch.Tensor] = {}
    want = set(names)
    for key, t in loader:
        base, _, part = key.partition(SEP)
        if base not in want:
            continue
        if not part:
            yield base, t
            continue
        pending[key] = t
        parts = [base + SEP + "U", base + SEP + "V"]
        if all(k in pending for k in parts):
            parts += [k + SCALE for k in parts if pending[k].dtype == torch.int8]  # int8: wait for its scales
            if all(k in pending for k in parts):
                got = {k: pending.pop(k) for k in parts}
                yield base, decompress_one(got, base, shapes[base])


def lowrank_spec(
    global_spec: Mapping[str, TensorSpec], max_norm: float | None, kind: str, factor_code: str | None = None
) -> PayloadSpec:
    """The declaration of a low-rank payload of a model with these tensors (ranks as bounded symbols;
    factors in ``factor_code``, default the tensor's dtype)."""
    tensors: dict[str, TensorDecl] = {}
    dims: dict[str, tuple[int, int]] = {}
    for name, spec in global_spec.items():
        if not factored(spec):
            tensors[name] = TensorDecl.like(spec)
            continue
        m, n = matrix_shape(spec.shape)
        sym = f"r:{name}"
        code = frozenset({factor_code or spec.dtype})
        tensors[name + SEP + "U"] = TensorDecl(code, (m, sym))
        tensors[name + SEP + "V"] = TensorDecl(code, (sym, n))
        if factor_code == "I8":  # one float32 scale per rank component (their finiteness: the decoded norm)
            tensors[name + SEP + "U" + SCALE] = TensorDecl(frozenset({"F32"}), (sym,))
            tensors[name + SEP + "V" + SCALE] = TensorDecl(frozenset({"F32"}), (sym,))
        dims[sym] = (1, max_rank(m, n))
    return PayloadSpec(kind=kind, tensors=tensors, dims=dims, max_norm=max_norm)


def payload_nbytes(payload: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in payload.values())
