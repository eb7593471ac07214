"""Pairwise and self masks modulo the BFV plain modulus, so that one decrypted upload is uniform.

Every client holds the BFV secret key, so the server together with any one client can decrypt
any single upload. Masks close that hole: before encrypting, client ``i`` adds to its packed
integer vector ``x_i`` (:mod:`carbonfed.privacy.packing`, entries modulo the plain modulus ``t``)

    ``M_i = PRG(b_i) + sum over neighbours j that shared this round of  s(i, j) * PRG(m_ij)  (mod t)``

with ``s(i, j) = +1`` if ``i`` precedes ``j`` in the roster and ``-1`` otherwise. The pairwise terms
cancel in the server's ciphertext sum (BFV sums are exact modulo ``t``, wrap included:
:mod:`carbonfed.privacy.he_ring`); the self masks ``PRG(b_i)`` of the summed clients are removed
by one plaintext subtraction from the encrypted sum (:func:`unmask_sum`, public context only).

Key schedule (all primitives from ``cryptography``; no cipher written here)
--------------------------------------------------------------------------
* Once per run each client makes an X25519 key pair and publishes the public half, signed with its
  Ed25519 key (:mod:`carbonfed.privacy.mask_wire`). The pair key ``K_ij`` is HKDF-SHA256 of the
  X25519 shared secret, bound to the run and the two names. It is never revealed.
* Round ``r`` of pair ``{i, j}``: block ``r`` of the ChaCha20 keystream of ``K_ij`` (the block
  function as a PRF of its counter; eight rounds' blocks come from one call) gives the pair seed
  ``m_ij^r`` (32 bytes) and the two AES-128-GCM
  keys that carry ``i``'s share to ``j`` and ``j``'s share to ``i``. Revealing round-``r`` values
  reveals nothing about other rounds, so a client that drops rejoins the next round as it is.
* The self-mask seed ``b_i^r`` is SHA-256 of a fresh Shamir secret (:mod:`carbonfed.privacy.shamir`,
  155 bits), shared among ``i``'s neighbours with threshold ``T``.
* ``PRG(seed)``: the ChaCha20 keystream of ``seed`` (nonce: the vector's ``purpose``, so the update,
  the counts and the statistics of one round get independent masks), cut into 32-bit words, each
  masked to the bit length of ``t`` and *rejected* if ``>= t``: exactly uniform modulo ``t`` (no
  modular-reduction bias; for the 32-bit batching prime ``t = 4294828033`` one word in 30 800 is
  redrawn, for a 20-bit prime at most one in two).
* Flower 1.42's SecAgg+ pieces are not used: ``secaggplus_utils.pseudo_rand_gen`` folds the seed to
  32 bits for numpy's Mersenne Twister and never draws ``num_range - 1``; ``generate_shared_key``
  is ECDH on NIST curves with Fernet (base64, 57 bytes of overhead per share); its Shamir is
  pycryptodome's GF(2^128) in pure Python, minutes per 131-client round
  (:mod:`carbonfed.privacy.shamir`). The same constructions come from ``cryptography`` here.

Dropout recovery (:mod:`carbonfed.privacy.mask_recovery`)
--------------------------------------------------------
``U`` = clients whose share bundle arrived (everyone masks with its neighbours in ``U``), ``S`` = the
clients whose ciphertexts the server sums, ``D = U - S`` (dropped at any point after sharing, or
excluded). *Seeds step*: every ``j`` in ``S`` reveals ``m_jl^r`` for its neighbours ``l`` in ``D``,
checked against the 16-byte commitment ``l`` made when it shared. *Keys step*: the holders the server
picks (enough for ``T`` shares of every summed client's self mask: ``T + 1`` clients of a complete graph;
more only if one fails) each reveal, for each summed neighbour, the AES key of the share that neighbour
dealt it, so a round's keys step is ``T + 1`` messages, not ``n``; the server opens
the share ciphertexts it kept from the bundles (a wrong key fails authentication and names the
holder), rebuilds each ``b_j^r`` from ``T`` shares and checks it against ``j``'s commitment. A client
that fails or skips the seeds step is moved to ``D`` (its own update leaves the sum); the keys step
needs only ``T`` of each dealer's holders alive. The seeds step goes to every summed client (with
nobody dropped its reply is empty) and doubles as a liveness check: a client that uploads and
then vanishes is left out, as if it had never sent; one that vanishes in the keys step stays in.

Why the self mask is needed although the server never sees a plaintext
-----------------------------------------------------------------------
Recovery reveals a dropped client's pairwise seeds. A client whose ciphertext arrived late, or
that a dishonest server *declares* dropped, would then be exposed to the server plus one key
holder: decrypt its ciphertext, subtract the revealed pairwise masks. The self mask ``b_j`` is
what stays: it is rebuilt only for summed clients, and an honest holder never answers both the
seeds step and the keys step for the same neighbour (it refuses the seeds step once it has
revealed keys, and refuses the key of a neighbour whose seed it revealed). HE alone does not help
here because every client holds the decryption key.

Who learns what (``k`` neighbours per client, ``k = n - 1`` by default; threshold ``T``; ``c``
colluding clients among a client's neighbours, each a key holder)
---------------------------------------------------------------------------------------------
* The server alone: ciphertexts (BFV, no secret key) and masks it cannot apply; nothing about any
  update, not even the aggregate.
* The server with ``c < 2T - k`` clients, even if it lies about who dropped and shows different
  clients different lists: only the sum of the honest summed clients' updates. To unmask ``j`` it
  needs ``T`` key reveals for ``b_j`` and every pairwise seed of ``j`` with an honest neighbour; an
  honest neighbour gives one or the other, ``j`` itself reveals seeds for at most ``k - T`` "dropped"
  neighbours (it refuses the seeds step if fewer than ``T`` of its neighbours remain summed),
  so the keys available are at most ``c + k - T < T``.
* The server with ``2T - k <= c < T`` clients: aggregates only while the server follows the protocol
  (the lists it sends are the true ones); a server that also equivocates can unmask a client.
* ``T`` or more colluding clients (with the server): any client's update. They hold ``T`` share
  keys of every dealer, and can make a client reveal its seeds with all honest neighbours.

:func:`plan_masks` picks ``T = k - floor(n / 3)``: a round survives any third of its clients dropping
at any point; for 131 clients ``T = 87`` and the first bound is ``c <= 43``.

Guarantees
----------
* :func:`uniform_mod` is exactly uniform modulo ``t`` given a uniform seed, and deterministic.
* :func:`mask_vector` returns entries in the centred range of ``t`` (what
  :class:`~carbonfed.privacy.he.BFVCipher` encrypts); the masks of all clients in ``S`` sum to the
  correction :class:`~carbonfed.privacy.mask_recovery.RoundRecovery` computes.
* :func:`unmask_sum` needs the public context only and leaves a ciphertext that loads, adds and
  decrypts like any aggregate (it adds one rounding term to the noise, as one more ciphertext would:
  a run with masks needs a ring whose :func:`~carbonfed.privacy.he_ring.exact_terms` covers
  ``n + 1`` terms).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from carbonfed.privacy.signing import canonical

DOMAIN = b"carbonfed-mask/v1/"
COMMIT_BYTES = 16
KEY_BYTES = 16            # AES-128-GCM key of one share
SEED_BYTES = 32
_MASK_TAG = b"mask"
_ROUND_TAG = b"rnd\0"


# -- pseudo-random expansion ----------------------------------------------------------------------

def _check_prg(seed: bytes, modulus: int) -> None:
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a mask seed is {SEED_BYTES} bytes")
    if not 2 <= modulus <= 2 ** 32:
        raise ValueError("the modulus must lie in 2 .. 2^32")


def _words(stream, n: int, modulus: int) -> np.ndarray:
    return _masked_words(stream.update(bytes(4 * n)), modulus).astype(np.int64)


def _masked_words(raw: bytes, modulus: int) -> np.ndarray:
    """32-bit little-endian words of ``raw`` (uint32), each masked to the bit length of ``modulus``
    (read in place when that is 32 bits)."""
    words, bits = np.frombuffer(raw, dtype="<u4"), (modulus - 1).bit_length()
    return words if bits >= 32 else words & np.uint32((1 << bits) - 1)


def _stream(seed: bytes, purpose: int):
    nonce = b"\0" * 4 + _MASK_TAG + int(purpose).to_bytes(8, "little")
    return Cipher(algorithms.ChaCha20(seed, nonce), mode=None).encryptor()


def _first_draw(length: int) -> int:
    return length + length // 16 + 8


def uniform_mod(seed: bytes, length: int, modulus: int, purpose: int = 0) -> np.ndarray:
    """``length`` integers uniform in ``[0, modulus)`` from the ChaCha20 keystream of ``seed``
    under the nonce ``purpose`` (rejection sampling on words masked to ``modulus``'s bit length).
    Each vector a client masks in one round has its own ``purpose``: independent masks."""
    _check_prg(seed, modulus)
    stream, parts, have, draw = _stream(seed, purpose), [], 0, _first_draw(length)
    while have < length:
        words = _words(stream, draw, modulus)
        kept = words[words < modulus][:length - have]
        parts.append(kept)
        have += kept.size
        draw = length - have + 8
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def uniform_mod_many(seeds: list[bytes], length: int, modulus: int, purpose: int = 0) -> np.ndarray:
    """``uniform_mod(seed, length, modulus, purpose)`` for each seed, one row each (int64)."""
    return _uniform_rows(seeds, length, modulus, purpose).astype(np.int64)


def _uniform_rows(seeds: list[bytes], length: int, modulus: int, purpose: int = 0) -> np.ndarray:
    """:func:`uniform_mod_many` as 32-bit words, vectorised: a row whose first ``length`` words were
    all accepted is those words, read in place; only the others, about one row in eight for the
    32-bit batching prime and 4096 slots, are compacted."""
    if not seeds:
        return np.zeros((0, length), dtype=np.uint32)
    for seed in seeds:
        _check_prg(seed, modulus)
    draw = _first_draw(length)
    zeros = bytes(4 * draw)                                   # as _words, all rows at once
    raw = b"".join([_stream(seed, purpose).update(zeros) for seed in seeds])
    rows = _masked_words(raw, modulus).reshape(len(seeds), draw)
    out = rows[:, :length]
    redo = np.flatnonzero((out >= modulus).any(axis=1))
    if redo.size:
        out = out.copy()
        for j in redo:
            kept = rows[j][rows[j] < modulus]                 # the first `length` accepted words
            out[j] = kept[:length] if kept.size >= length else uniform_mod(seeds[j], length, modulus, purpose)
    return out


def centred(v: np.ndarray, modulus: int) -> np.ndarray:
    """Representatives in ``(-modulus/2, modulus/2]`` of ``v`` modulo ``modulus``."""
    v = np.mod(np.asarray(v, dtype=np.int64), modulus)
    return np.where(v > modulus // 2, v - modulus, v)


def commit(kind: bytes, value: bytes) -> bytes:
    """16-byte SHA-256 commitment to a 32-byte random ``value`` (hiding and binding)."""
    return hashlib.sha256(DOMAIN + b"commit/" + kind + b"/" + value).digest()[:COMMIT_BYTES]


def self_seed(secret_bytes: bytes) -> bytes:
    """The self-mask seed of a Shamir secret."""
    return hashlib.sha256(DOMAIN + b"self/" + secret_bytes).digest()


# -- neighbourhoods and thresholds ----------------------------------------------------------------

@dataclass(frozen=True)
class MaskPlan:
    """``clients`` on the roster, each with ``degree`` neighbours, self-mask threshold ``threshold``."""

    clients: int
    degree: int
    threshold: int

    @property
    def max_dropped(self) -> int:
        """Dropped neighbours a client's neighbourhood survives (complete graph: per round)."""
        return self.degree - self.threshold

    @property
    def collusion_bound(self) -> int:
        """Most colluding clients for which the server, however it lies, learns aggregates only."""
        return max(-1, 2 * self.threshold - self.degree - 1)

    def describe(self) -> dict:
        return {"clients": self.clients, "neighbours": self.degree, "threshold": self.threshold,
                "max_dropped": self.max_dropped, "collusion_bound": self.collusion_bound,
                "graph": "complete" if self.degree == self.clients - 1 else "circulant"}

    def who_learns_what(self) -> dict[str, str]:
        """Which coalitions learn what (the module docstring's table, with this plan's numbers)."""
        t, c = self.threshold, self.collusion_bound
        return {
            "server_alone": "ciphertexts only: no single update and not even the aggregate (it holds no key)",
            "server_with_fewer_than_t_clients": (
                f"aggregates only: with at most {c} colluding clients (key holders) even if it lies about who "
                f"dropped; with {c + 1} to {t - 1} only while it sends every client the true lists"
                if c >= 0 else f"aggregates only with fewer than {t} colluding clients while it sends every "
                "client the true lists (no bound holds against an equivocating server for this plan)"),
            "t_or_more_clients": (f"{t} or more colluding clients with the server can unmask any single client's "
                                  "update: against them only the DP noise that client added itself protects it "
                                  "(ddp+he: its per-upload ε)"),
        }


def plan_masks(clients: int, degree: int | None = None, max_dropped: int | None = None) -> MaskPlan:
    """Complete graph (``degree=None``) or a ``degree``-regular circulant one; the threshold leaves
    ``max_dropped`` (default: a third of the clients, or of the neighbours) droppable."""
    if clients < 2:
        raise ValueError("masks need at least two clients")
    k = clients - 1 if degree is None or degree >= clients - 1 else int(degree)
    if k < clients - 1 and (k < 2 or k % 2):
        raise ValueError("a circulant neighbourhood needs an even degree >= 2")
    drop = (clients // 3 if k == clients - 1 else k // 3) if max_dropped is None else int(max_dropped)
    if not 0 <= drop < k:
        raise ValueError(f"max_dropped {drop} must lie in 0 .. {k - 1}")
    return MaskPlan(clients=clients, degree=k, threshold=k - drop)


def neighbourhoods(roster: list[str], plan: MaskPlan, run: str) -> dict[str, tuple[str, ...]]:
    """Each client's neighbours: everyone else, or the ``degree`` nearest on a circle ordered by
    SHA-256 of (run, name), a public order nobody chooses. Memoised per process (a client rebuilds
    its masking client at every message: the complete graph is ``n^2`` names); a fresh dict."""
    return dict(_neighbourhoods(tuple(sorted(roster)), plan, run))


@functools.lru_cache(maxsize=16)
def _neighbourhoods(names: tuple[str, ...], plan: MaskPlan, run: str) -> dict[str, tuple[str, ...]]:
    if len(names) != plan.clients or len(set(names)) != len(names):
        raise ValueError("the roster must list plan.clients distinct names")
    if plan.degree == len(names) - 1:
        return {c: tuple(o for o in names if o != c) for c in names}
    ring = sorted(names, key=lambda c: hashlib.sha256(canonical([run, c])).digest())
    half, n = plan.degree // 2, len(ring)
    out = {}
    for pos, c in enumerate(ring):
        near = {ring[(pos + d) % n] for d in range(-half, half + 1) if d}
        out[c] = tuple(sorted(near))
    return out


# -- keys -----------------------------------------------------------------------------------------

def new_agreement_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def agreement_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def pair_key(key: X25519PrivateKey, peer_public: bytes, run: str, me: str, peer: str) -> bytes:
    """``K_ij``: HKDF-SHA256 of the X25519 secret, bound to the run and the (sorted) pair. Raises
    ``ValueError`` for a malformed or low-order peer key."""
    shared = key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    info = DOMAIN + b"pair/" + canonical([run, *sorted((me, peer))])
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


@dataclass(frozen=True)
class PairRound:
    """Round material of one pair: the mask seed and the two share keys (``low``: the key of the
    share that the pair's first client in roster order deals to the second)."""

    seed: bytes
    key_low: bytes
    key_high: bytes

    def share_key(self, dealer_first: bool) -> bytes:
        return self.key_low if dealer_first else self.key_high


ROUND_BATCH = 8           # rounds whose pair blocks one ChaCha20 call makes (one cipher set-up, not eight)


@functools.lru_cache(maxsize=1 << 15)
def _pair_blocks(k_ij: bytes, batch: int) -> bytes:
    """ChaCha20 keystream blocks ``ROUND_BATCH * batch ..`` of ``K_ij`` (block counter = round)."""
    nonce = (batch * ROUND_BATCH).to_bytes(4, "little") + _ROUND_TAG + bytes(8)
    return Cipher(algorithms.ChaCha20(k_ij, nonce), mode=None).encryptor().update(bytes(64 * ROUND_BATCH))


@functools.lru_cache(maxsize=1 << 16)     # pure; asked for again at every message of the round (and the next)
def pair_round(k_ij: bytes, rnd: int) -> PairRound:
    rnd = int(rnd)
    if not 0 <= rnd < 2 ** 32 - ROUND_BATCH:
        raise ValueError(f"round {rnd} outside the ChaCha20 block counter")
    at = 64 * (rnd % ROUND_BATCH)
    block = _pair_blocks(k_ij, rnd // ROUND_BATCH)[at:at + 64]
    return PairRound(seed=block[:32], key_low=block[32:48], key_high=block[48:64])


# -- masks ----------------------------------------------------------------------------------------

def pair_sign(me: str, peer: str) -> int:
    return 1 if me < peer else -1


def mask_sum(length: int, modulus: int, own: bytes | None, pair_seeds: dict[str, bytes], me: str,
             purpose: int = 0) -> np.ndarray:
    """``PRG(own) + sum s(me, j) PRG(seed_j)`` modulo ``modulus``, in ``[0, modulus)``."""
    plus = [p for p in pair_seeds if pair_sign(me, p) > 0]
    minus = [p for p in pair_seeds if pair_sign(me, p) < 0]
    seeds = [pair_seeds[p] for p in plus + minus] + ([own] if own is not None else [])
    rows = _uniform_rows(seeds, length, modulus, purpose)     # (sums of fewer than 2^31 words fit in int64)
    k, m = len(plus), len(plus) + len(minus)
    total = rows[:k].sum(axis=0, dtype=np.int64) - rows[k:m].sum(axis=0, dtype=np.int64)
    if own is not None:
        total += rows[m]
    return np.mod(total, modulus)


def mask_vector(vector: np.ndarray, mask: np.ndarray, modulus: int) -> np.ndarray:
    """``vector + mask`` modulo ``modulus``, centred (what a BFV cipher encrypts)."""
    return centred(np.asarray(vector, dtype=np.int64) + np.asarray(mask, dtype=np.int64), modulus)


def unmask_sum(cipher, total: bytes, correction: np.ndarray) -> bytes:
    """``total - correction``: for a BFV cipher a plaintext-ciphertext subtraction under the
    public context (TenSEAL ``BFVVector - list``); for the plaintext twin, modular arithmetic."""
    corr = centred(correction, cipher.plain_modulus)
    if corr.shape != (cipher.length,):
        raise ValueError(f"correction has shape {corr.shape}, the vectors {cipher.length} slots")
    vec = cipher.load(total)
    if isinstance(vec, np.ndarray):
        return centred(vec - corr, cipher.plain_modulus).astype(np.int64).tobytes()
    return (vec - corr.tolist()).serialize()
