"""The ring of a run: the smallest BFV parameters that sum its vectors exactly.

Noise bound (why a sum of ``K`` seeded symmetric ciphertexts decrypts exactly)
------------------------------------------------------------------------------
Notation: ring ``R = Z[X]/(X^N + 1)``, plain modulus ``t``, data-level coefficient modulus ``q``
(the product of the ciphertexts' primes; one prime in the rings :func:`ring_for` picks), secret
key ``s`` ternary, ``||.||`` the largest absolute coefficient, ``[x]_t`` reduction modulo ``t``.

1. *Fresh ciphertext.* SEAL's ``encrypt_symmetric`` (BFV) draws ``a`` uniform from the public
   seed and ``e`` from its noise sampler, and outputs ``(c0, c1) = (-(a s + e) + round(q m / t), a)
   mod q``, where ``m`` is the batch encoding (coefficients in ``[0, t)``) and the rounding is
   ``multiply_add_plain_with_scaling_variant`` (nearest integer). SEAL's sampler is the centred
   binomial distribution of standard deviation 3.2, the difference of two Hamming weights of 21
   bits, so ``||e|| <= 21 = B``; the alternative build (``SEAL_USE_GAUSSIAN_NOISE``) clips its
   normal at 6 sigma = 19.2 < B. So ``c0 + c1 s = q m / t + r - e (mod q)`` with ``||r|| <= 1/2``.
2. *Sum.* Adding ``K`` ciphertexts adds coefficients modulo ``q`` exactly. With
   ``M = sum m_k = [M]_t + t w`` (``w`` integral), ``q M / t = q [M]_t / t + q w = q [M]_t / t
   (mod q)``, so ``c0 + c1 s = q [M]_t / t + v (mod q)`` with ``||v|| <= K (B + 1/2)``: the
   wrap of the plaintext sum modulo ``t`` costs nothing. An aggregate of ``k`` replies that is
   added again counts as ``k`` terms; nothing else touches a ciphertext.
3. *Decryption* returns ``round(t (c0 + c1 s) / q) mod t = round([M]_t + t v / q) mod t``, which is
   ``[M]_t`` whenever ``||t v / q|| < 1/2``. SEAL rounds with the BEHZ base conversion and an
   auxiliary 61-bit prime ``gamma``, exact when ``||t v / q|| <= 1/2 - k / gamma`` (``k`` primes in
   ``q``). We demand ``||t v / q|| <= 1/4`` (one bit of noise budget left), i.e.
   ``K (2B + 1) / 2 <= q / (4 t)``, i.e. ``K <= q / (2 t (2B + 1)) = q / (86 t)``.
4. ``[M]_t`` batch-decodes to each slot's sum modulo ``t``, centred: the integers
   :class:`~carbonfed.privacy.secure_sum.PlainCipher` computes. Hence :func:`exact_terms`.

Guarantees
----------
* :func:`exact_terms` is a lower bound for every prime SEAL may choose (a ``b``-bit prime is at
  least ``2^(b-1)``), taken over the data-level primes only (the last prime of a multi-prime chain
  is TenSEAL's special prime, absent from fresh ciphertexts).
* :func:`ring_for` returns the smallest degree, then the smallest single prime, that holds a vector
  of ``length`` slots at 128-bit security (HomomorphicEncryption.org table, as SEAL enforces) with
  ``exact_terms >= max_terms``. A degree below 4096 is chosen only if the whole vector fits one
  ciphertext, so that every ciphertext starts with a check slot
  (:data:`carbonfed.privacy.packing.BLOCK`); longer vectors use 4096-slot ciphertexts.
* The plain modulus is :attr:`HEParams().plain_modulus` for every ring returned, so the
  fixed-point integers do not depend on the ring. :func:`check_ring` refuses keys whose ring
  breaks any of these for a run.
"""

from __future__ import annotations

from tenseal import sealapi

from carbonfed.privacy.he import HEParams
from carbonfed.privacy.packing import BLOCK

NOISE_BOUND = 21                    # largest |coefficient| of SEAL's encryption noise
NOISE_FACTOR = 2 * (2 * NOISE_BOUND + 1)   # K terms are exact when K * NOISE_FACTOR * t <= q
DEGREES = (1024, 2048, 4096)
MAX_PRIME_BITS = 60                 # SEAL's largest coefficient-modulus prime


def data_bits(params: HEParams) -> tuple[int, ...]:
    """Bit sizes of the data-level primes (all but TenSEAL's special prime, if any)."""
    bits = tuple(params.coeff_mod_bit_sizes)
    return bits[:-1] if len(bits) > 1 else bits


def exact_terms(params: HEParams) -> int:
    """How many fresh seeded ciphertexts may be summed with an exact decryption (module docstring)."""
    q_min = 1 << sum(b - 1 for b in data_bits(params))
    return q_min // (NOISE_FACTOR * params.plain_modulus)


def _prime_bits(max_terms: int, t: int) -> int:
    """Smallest ``b`` with ``2^(b-1) >= NOISE_FACTOR * t * max_terms``."""
    return (NOISE_FACTOR * t * max_terms - 1).bit_length() + 1


def ring_for(length: int, max_terms: int) -> HEParams:
    """The smallest ring holding ``length`` slots with exact sums of ``max_terms`` ciphertexts."""
    if length < 1 or max_terms < 1:
        raise ValueError("length and max_terms must be >= 1")
    default = HEParams()
    bits = _prime_bits(max_terms, default.plain_modulus)
    for n in DEGREES:
        if n < BLOCK and length > n:
            continue
        if bits <= min(MAX_PRIME_BITS, sealapi.CoeffModulus.MaxBitCount(n, sealapi.SEC_LEVEL_TYPE.TC128)):
            return HEParams(poly_modulus_degree=n, coeff_mod_bit_sizes=(bits,),
                            plain_modulus_bits=default.plain_modulus_bits)
    raise ValueError(f"no ring of degree <= {DEGREES[-1]} sums {max_terms} terms exactly "
                     f"({bits}-bit prime needed)")


def check_ring(params: HEParams, length: int, max_terms: int) -> None:
    """Raise ``ValueError`` unless keys of ``params`` serve a run of ``length``-slot vectors and
    ``max_terms`` terms: the same plain modulus as the fixed-point layouts, 128-bit security,
    exact sums, and a check slot in every ciphertext."""
    problems = []
    if params.plain_modulus != HEParams().plain_modulus:
        problems.append(f"plain modulus {params.plain_modulus} differs from {HEParams().plain_modulus}")
    if params.security_bits() < 128:
        problems.append("less than 128-bit security")
    if exact_terms(params) < max_terms:
        problems.append(f"exact sums of at most {exact_terms(params)} terms, the run needs {max_terms}")
    if params.poly_modulus_degree < BLOCK and length > params.poly_modulus_degree:
        problems.append(f"{length} slots need several ciphertexts of degree {params.poly_modulus_degree}, "
                        f"but check slots cover {BLOCK}-slot blocks")
    if problems:
        raise ValueError(f"HE keys of {params} do not fit this run: " + "; ".join(problems) +
                         f" (keys for it: carbonfed.privacy.he.keygen(dir, ring_for({length}, {max_terms})))")
