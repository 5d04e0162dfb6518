"""Hadamard matrices and orthogonal rotations, for rotation methods (QuaRot).

A Hadamard matrix H of order n has entries ±1 and H Hᵀ = n I; H / √n is orthogonal. Orders
built here are n = d · 2^k, as the Kronecker product H_d ⊗ H_{2^k} of a small matrix and
Sylvester's H_{2^k}, where d is 1, 2, or given by Paley's constructions over a prime field:

    Paley I   d = q + 1,     q a prime ≡ 3 (mod 4)    (12, 20, 24, 32, 44, 48, 60, 68, 72, ...)
    Paley II  d = 2 (q + 1), q a prime ≡ 1 (mod 4)    (12, 28, 36, 60, 76, 84, 108, 124, ...)

The smallest such d is used (the largest power-of-two factor): SmolLM2's hidden size is
576 = 36 · 16, its MLP width 1536 = 12 · 128; Llama-2-7B's MLP width 11008 = 5504 · 2
(Paley I, q = 5503; QuaRot's table uses Williamson's 172 · 64 instead). The orders
below 400 left out are 52, 92, 100, 116, 156, 172, 184, 188, ... (multiples of 4 that need
other constructions); an order with no construction here raises `NoHadamard`.
"""

from __future__ import annotations

import functools
import math

import torch


class NoHadamard(ValueError):
    """No Hadamard matrix of the asked order is constructed here."""


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % p for p in range(2, math.isqrt(q) + 1))


def _quadratic_character(q: int) -> torch.Tensor:
    """χ(a) for a = 0..q-1 over the prime field GF(q): 0 at 0, 1 on squares, -1 elsewhere."""
    chi = -torch.ones(q, dtype=torch.float64)
    chi[sorted({a * a % q for a in range(1, q)})] = 1
    chi[0] = 0
    return chi


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = χ(j − i): antisymmetric when q ≡ 3 (mod 4), symmetric when q ≡ 1 (mod 4)."""
    index = torch.arange(q)
    return _quadratic_character(q)[(index.view(1, -1) - index.view(-1, 1)) % q]


def _bordered(q: int, sign: int) -> torch.Tensor:
    """[[0, 1ᵀ], [sign·1, Q]], the (q+1)-square conference-type matrix of Paley's constructions."""
    ones = torch.ones(q, dtype=torch.float64)
    top = torch.cat([torch.zeros(1, dtype=torch.float64), ones]).view(1, -1)
    bottom = torch.cat([sign * ones.view(-1, 1), _jacobsthal(q)], dim=1)
    return torch.cat([top, bottom])


def paley_i(q: int) -> torch.Tensor:
    """H = I + S with S = [[0, 1ᵀ], [−1, Q]] (q prime ≡ 3 mod 4): S is antisymmetric with
    S Sᵀ = q I, so H Hᵀ = I − S² = (q + 1) I."""
    if not (_is_prime(q) and q % 4 == 3):
        raise ValueError(f"Paley I needs a prime q ≡ 3 (mod 4), got {q}")
    return torch.eye(q + 1, dtype=torch.float64) + _bordered(q, -1)


def paley_ii(q: int) -> torch.Tensor:
    """From the symmetric conference matrix C = [[0, 1ᵀ], [1, Q]] (q prime ≡ 1 mod 4, C Cᵀ = q I):
    H = C ⊗ [[1, 1], [1, −1]] + I ⊗ [[1, −1], [−1, −1]], of order 2 (q + 1)."""
    if not (_is_prime(q) and q % 4 == 1):
        raise ValueError(f"Paley II needs a prime q ≡ 1 (mod 4), got {q}")
    c = _bordered(q, 1)
    plus = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, plus) + torch.kron(torch.eye(q + 1, dtype=torch.float64), zero)


def sylvester(order: int) -> torch.Tensor:
    """Sylvester's H_{2^k} = H_2 ⊗ ... ⊗ H_2 (symmetric)."""
    if order < 1 or order & (order - 1):
        raise ValueError(f"Sylvester's construction needs a power of two, got {order}")
    h = torch.ones(1, 1, dtype=torch.float64)
    base = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while h.shape[0] < order:
        h = torch.kron(base, h)
    return h


def small_hadamard(d: int) -> torch.Tensor | None:
    """A Hadamard matrix of order d from Paley I or II (or 1, 2), None if neither applies."""
    if d in (1, 2):
        return sylvester(d)
    if d % 4:
        return None
    if _is_prime(d - 1) and (d - 1) % 4 == 3:
        return paley_i(d - 1)
    q = d // 2 - 1
    if _is_prime(q) and q % 4 == 1:
        return paley_ii(q)
    return None


def split_order(n: int) -> tuple[int, int]:
    """(d, 2^k) with n = d · 2^k and d the smallest order with a construction; NoHadamard if none."""
    if n < 1:
        raise NoHadamard(f"no Hadamard matrix of order {n}")
    power = n & -n  # the largest power of two dividing n
    while power >= 1:
        if small_hadamard(n // power) is not None:
            return n // power, power
        power //= 2
    raise NoHadamard(f"no Hadamard matrix of order {n} is constructed here: orders are d · 2^k with "
                     "d = 1, 2, q + 1 (q a prime ≡ 3 mod 4, Paley I) or 2 (q + 1) (q a prime ≡ 1 mod 4, "
                     "Paley II)")


def describe_order(n: int) -> str:
    d, power = split_order(n)
    return f"{n}" if d == 1 else f"{n} = {d} x {power}" if power > 1 else f"{n} (Paley)"


@functools.lru_cache(maxsize=32)
def hadamard_factors(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(H_d, H_{2^k}) with H_d ⊗ H_{2^k} the Hadamard matrix of order n (float64, ±1 entries)."""
    d, power = split_order(n)
    small = small_hadamard(d)
    assert small is not None
    return small, sylvester(power)


def hadamard_matrix(n: int) -> torch.Tensor:
    """A ±1 Hadamard matrix of order n (float64): H_d ⊗ H_{2^k}, see the module docstring."""
    return torch.kron(*hadamard_factors(n))


def kron_transform(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x (A ⊗ B) / √n along the last dimension without forming A ⊗ B: with x viewed as
    X [d, 2^k] (row-major), x (A ⊗ B) is Aᵀ X B."""
    blocks = x.reshape(*x.shape[:-1], a.shape[0], b.shape[0])
    return (a.t() @ blocks @ b).reshape(x.shape) / math.sqrt(x.shape[-1])


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """x H / √n along the last dimension, H = `hadamard_matrix(n)` (orthogonal: x ↦ x H / √n
    keeps norms and inner products)."""
    a, b = (f.to(device=x.device, dtype=x.dtype) for f in hadamard_factors(x.shape[-1]))
    return kron_transform(x, a, b)


def random_hadamard(n: int, generator: torch.Generator) -> torch.Tensor:
    """diag(s) H / √n with seeded random signs s (QuaRot's randomized Hadamard, after QuIP#):
    orthogonal, float64."""
    signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64) * 2 - 1
    return signs.view(-1, 1) * hadamard_matrix(n) / math.sqrt(n)


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal matrix (float64): Q of the QR decomposition of a Gaussian matrix,
    its columns' signs fixed by diag(R) (QuaRot's `rotate_mode: random`)."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).view(1, -1)
