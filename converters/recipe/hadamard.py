"""Hadamard matrices of (almost) any size the hidden dimensions of LLMs need.

A Hadamard matrix H of order n has entries ±1 and H·Hᵀ = n·I, so H/√n is
orthogonal.  We build H(n) = kron(Sylvester(2^a), B(m)) with n = 2^a·m, where
the base B(m) comes from one of:
  * Sylvester's doubling (m = 1, 2);
  * Paley's construction I (R. E. A. C. Paley, "On orthogonal matrices", 1933):
    for a prime power q ≡ 3 (mod 4), an order-(q+1) matrix from the quadratic
    character χ of GF(q) (the Jacobsthal matrix Q[i][j] = χ(x_i − x_j));
        H = I + [[0, 1ᵀ], [−1, Q]]
    (a skew Hadamard matrix: Q is antisymmetric, Q Qᵀ = qI − J, Q J = 0);
  * Paley's construction II: for a prime power q ≡ 1 (mod 4), an order-2(q+1)
    matrix: S = [[0, 1ᵀ], [1, Q]] (symmetric conference matrix), then replace
    each 0 by [[1, −1], [−1, −1]] and each ±1 by ±[[1, 1], [1, −1]].
That covers 12, 20, 28 (GF(27)), 36, 44, 52 (GF(25)), 60, 68, 76, 84, 108, 140,
148, ...: all the sizes QuaRot/QoQ list except 156 and 172 (which need
Williamson-type constructions; none of the supported models' hidden sizes
needs them).  Finite fields of prime-power order are built here as
polynomials modulo an irreducible polynomial found by search.

Everything is deterministic and computed in exact integer arithmetic; every
matrix is checked (H·Hᵀ = nI) before it is returned.
"""

from __future__ import annotations

import functools
import itertools

import torch


# ---------------------------------------------------------------- finite fields
def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p^k and p prime, else None."""
    if q < 2:
        return None
    p = next(d for d in range(2, q + 1) if q % d == 0)  # smallest prime factor
    k, r = 0, q
    while r % p == 0:
        r //= p
        k += 1
    return (p, k) if r == 1 else None


def _polymulmod(a: tuple, b: tuple, mod: tuple, p: int) -> tuple:
    """Product of two field elements (coefficient tuples, low degree first) modulo `mod`."""
    k = len(mod) - 1  # mod is monic of degree k
    prod = [0] * (2 * k - 1)
    for i, ai in enumerate(a):
        if ai:
            for j, bj in enumerate(b):
                prod[i + j] = (prod[i + j] + ai * bj) % p
    for d in range(len(prod) - 1, k - 1, -1):  # reduce x^d with d >= k
        c = prod[d]
        if c:
            for t in range(k + 1):
                prod[d - k + t] = (prod[d - k + t] - c * mod[t]) % p
    return tuple(prod[:k])


def _field_elements(p: int, k: int) -> tuple[list[tuple], callable]:
    """Elements of GF(p^k) and its multiplication (elements as coefficient tuples)."""
    elems = list(itertools.product(range(p), repeat=k))
    if k == 1:
        return elems, lambda a, b: ((a[0] * b[0]) % p,)
    zero = (0,) * k
    for tail in itertools.product(range(p), repeat=k):  # monic candidates x^k + ...
        mod = tuple(tail) + (1,)
        if tail[0] == 0:
            continue  # divisible by x
        # Irreducible <=> the quotient ring has no zero divisors.
        ok = all(
            _polymulmod(a, b, mod, p) != zero
            for a in elems[1:]
            for b in elems[1:]
        )
        if ok:
            return elems, lambda a, b, m=mod: _polymulmod(a, b, m, p)
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i][j] = χ(x_i − x_j) for GF(q) (χ: 0 at 0, +1 on squares, −1 otherwise)."""
    p, k = _prime_power(q)
    elems, mul = _field_elements(p, k)
    index = {e: i for i, e in enumerate(elems)}
    squares = {mul(e, e) for e in elems[1:]}
    chi = [0 if e == elems[0] else (1 if e in squares else -1) for e in elems]
    sub = lambda a, b: tuple((x - y) % p for x, y in zip(a, b))  # noqa: E731
    Q = torch.zeros(q, q, dtype=torch.int64)
    for i, a in enumerate(elems):
        for j, b in enumerate(elems):
            Q[i, j] = chi[index[sub(a, b)]]
    return Q


def paley1(q: int) -> torch.Tensor:
    """Order q+1 (q prime power ≡ 3 mod 4)."""
    Q = _jacobsthal(q)
    n = q + 1
    S = torch.zeros(n, n, dtype=torch.int64)
    S[0, 1:] = 1
    S[1:, 0] = -1
    S[1:, 1:] = Q
    return S + torch.eye(n, dtype=torch.int64)


def paley2(q: int) -> torch.Tensor:
    """Order 2(q+1) (q prime power ≡ 1 mod 4)."""
    Q = _jacobsthal(q)
    n = q + 1
    S = torch.zeros(n, n, dtype=torch.int64)
    S[0, 1:] = 1
    S[1:, 0] = 1
    S[1:, 1:] = Q
    zero_blk = torch.tensor([[1, -1], [-1, -1]])
    one_blk = torch.tensor([[1, 1], [1, -1]])
    H = torch.kron(S, one_blk) + torch.kron((S == 0).to(torch.int64), zero_blk)
    return H


def sylvester(n: int) -> torch.Tensor:
    """Order n = 2^a by Sylvester's doubling."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester Hadamard needs a power of two, got {n}")
    H = torch.ones(1, 1, dtype=torch.int64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


def is_hadamard(H: torch.Tensor) -> bool:
    """±1 entries and H·Hᵀ = nI exactly (float64 products of ±1 are exact for n < 2^53)."""
    n = H.shape[0]
    if H.dim() != 2 or H.shape[1] != n or not bool((H.abs() == 1).all()):
        return False
    Hf = H.to(torch.float64)
    return torch.equal(Hf @ Hf.T, n * torch.eye(n, dtype=torch.float64))


@functools.lru_cache(maxsize=None)
def base_hadamard(m: int) -> torch.Tensor | None:
    """A Hadamard matrix of order m from Sylvester/Paley I/Paley II, or None."""
    if m in (1, 2):
        return sylvester(m)
    if m % 4:
        return None
    pp = _prime_power(m - 1)
    if pp is not None and (m - 1) % 4 == 3:
        H = paley1(m - 1)
    else:
        pp = _prime_power(m // 2 - 1)
        if pp is None or (m // 2 - 1) % 4 != 1:
            return None
        H = paley2(m // 2 - 1)
    assert is_hadamard(H), f"Paley construction of order {m} failed"
    return H


@functools.lru_cache(maxsize=None)
def hadamard_matrix(n: int) -> torch.Tensor:
    """An integer (±1) Hadamard matrix of order n; ValueError if none is constructible here."""
    if n < 1:
        raise ValueError(f"order must be positive, got {n}")
    a = (n & -n).bit_length() - 1  # largest power of two dividing n
    for t in range(a, -1, -1):  # prefer the smallest base
        m = n >> t
        B = base_hadamard(m)
        if B is not None:
            # kron of Hadamard matrices is Hadamard (the base was checked).
            return torch.kron(sylvester(1 << t), B)
    raise ValueError(
        f"no Hadamard matrix of order {n} can be constructed here (n = 2^a·m needs m "
        "in {1, 2} or a Paley order: q+1 with q ≡ 3 mod 4 or 2(q+1) with q ≡ 1 mod 4, "
        "q a prime power); disable the rotation (--no-rotation)"
    )


def orthogonal_hadamard(n: int, seed: int | None = 0, dtype=torch.float64) -> torch.Tensor:
    """R = D·H/√n, orthogonal; D = diag(random ±1) from `seed` (None: no signs)."""
    H = hadamard_matrix(n).to(dtype)
    R = H / (n ** 0.5)
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        signs = torch.randint(0, 2, (n,), generator=g).to(dtype) * 2 - 1
        R = signs[:, None] * R
    return R
