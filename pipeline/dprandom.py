"""The randomness every DP guarantee rests on: a per-job CSPRNG seeded from OS entropy, never written down.

Whoever can regenerate DP noise can subtract it. The aggregator is exactly the adversary fedpath's
privacy report models, and a config seed is a shared secret at best, so no DP draw (DP-SGD noise, Poisson
sampling of tiles or slides, update-level and central noise) may come from the config seed or from
torch's global Mersenne Twister. Opacus' own ``secure_mode`` needs ``torchcsprng``, which has no build for
the pinned torch, so :class:`SecureRandom` is its equivalent:

* **Source.** An AES-256-CTR keystream (OpenSSL through ``cryptography``; the construction of NIST's
  CTR_DRBG without its reseeding) keyed by 32 bytes and a 16-byte counter block from ``os.urandom`` at
  construction. Key and counter live only in the OpenSSL context of this process; the object refuses to
  be pickled, so it cannot be checkpointed, sent to a worker or logged by accident.
* **Uniforms** carry the full 53 bits of a float64 mantissa: ``(k + 0.5) / 2**53`` for a 53-bit ``k``,
  never 0 nor 1.
* **Gaussians** follow Opacus' secure mode (Holohan & Braghin 2021, §5.1, against the floating-point
  attack of Mironov 2012 and Jin et al. 2022): each draw is the sum of four independent Box-Muller
  normals divided by 2, computed in float64 and added to the target in float64, so the released float32
  is rounded once from a value whose low-order bits carry no trace of the input.

:class:`SeededRandom` has the same interface from a fixed seed, for debugging only: a run using it is
marked "not private" in its ledger and privacy statement, and its ε is never printed as a guarantee.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
from collections.abc import Sequence

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

#: what the ledger and privacy statement record as the noise source
SECURE_SOURCE = "csprng: AES-256-CTR keyed from os.urandom per job (key never stored)"
SEEDED_SOURCE = "seeded: AES-256-CTR keyed from the config seed (debug switch; NOT PRIVATE)"

_TWO_PI = 2.0 * math.pi
_MANTISSA = (1 << 53) - 1


class NoiseSource:
    """A keystream turned into uniforms, Bernoulli masks, subsets and Gaussians (the DP draws)."""

    source: str = ""
    private: bool = False

    def __init__(self, key: bytes, counter: bytes) -> None:
        self._enc = Cipher(algorithms.AES(key), modes.CTR(counter)).encryptor()
        self._lock = threading.Lock()

    def __reduce__(self) -> None:  # type: ignore[override]
        raise TypeError(f"{type(self).__name__} holds DP noise state: it is never pickled or written")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r})"

    # -- primitives --------------------------------------------------------------------------------------
    def random_bytes(self, n: int) -> bytes:
        """``n`` keystream bytes (encrypting zeros in CTR mode yields the keystream itself)."""
        with self._lock:
            return self._enc.update(bytes(n))

    def uniform(self, n: int) -> torch.Tensor:
        """``n`` float64 uniforms in (0, 1), each from 53 random bits."""
        raw = np.frombuffer(self.random_bytes(8 * n), dtype=np.int64)
        k = torch.from_numpy(raw.copy()).bitwise_and_(_MANTISSA)
        return (k.to(torch.float64) + 0.5) * (2.0**-53)

    def bernoulli(self, n: int, p: float) -> np.ndarray:
        """A boolean mask of ``n`` independent draws, each True with probability ``p`` (Poisson sampling)."""
        if n == 0:
            return np.zeros(0, dtype=bool)
        return (self.uniform(n) < p).numpy()

    def subset(self, items: Sequence[int] | np.ndarray, k: int) -> list[int]:
        """``k`` distinct members of ``items``, uniformly (a random permutation's prefix)."""
        arr = np.asarray(items)
        if k >= len(arr):
            return [int(v) for v in arr]
        order = np.argsort(self.uniform(len(arr)).numpy(), kind="stable")
        return [int(v) for v in arr[order[:k]]]

    def standard_normal(self, n: int) -> torch.Tensor:
        """``n`` float64 N(0, 1) draws by Box-Muller, both outputs of every pair used."""
        m = (n + 1) // 2
        u = self.uniform(2 * m)
        r = torch.sqrt(-2.0 * torch.log(u[:m]))
        theta = _TWO_PI * u[m:]
        return torch.cat([r * torch.cos(theta), r * torch.sin(theta)])[:n]

    def gaussian(self, shape: Sequence[int] | torch.Size, std: float) -> torch.Tensor:
        """float64 N(0, std²) of ``shape``: (Z1 + Z2 + Z3 + Z4) / 2, Opacus' secure-mode construction."""
        n = int(math.prod(shape))
        z = self.standard_normal(4 * n).view(4, n).sum(0).mul_(0.5 * std)
        return z.view(*shape)

    def add_gaussian(self, x: torch.Tensor, std: float) -> torch.Tensor:
        """``x + N(0, std²)`` computed in float64 and rounded once to ``x``'s dtype (a new tensor)."""
        if std == 0:
            return x.clone()
        noisy = x.detach().to(torch.float64) + self.gaussian(x.shape, std).to(x.device)
        return noisy.to(x.dtype)


class SecureRandom(NoiseSource):
    """The default: keyed from the OS entropy pool, unpredictable to everyone, this process included."""

    source = SECURE_SOURCE
    private = True

    def __init__(self) -> None:
        super().__init__(os.urandom(32), os.urandom(16))


class SeededRandom(NoiseSource):
    """Debug only: the same draws for the same seed. Anyone who knows the seed can subtract the noise."""

    source = SEEDED_SOURCE
    private = False

    def __init__(self, seed: int, label: str = "") -> None:
        digest = hashlib.sha256(f"fedpath-debug-noise:{seed}:{label}".encode()).digest()
        super().__init__(digest, bytes(16))


def noise_source(reproducible: bool = False, seed: int = 0, label: str = "") -> NoiseSource:
    """The job's noise source: secure unless the config's debug switch asks for seeded (not private) noise."""
    return SeededRandom(seed, label) if reproducible else SecureRandom()
