"""A client's signing side: its charter, its Ed25519 key and its check-slot tags.

A :class:`Signer` is what a client holds of the run's integrity: the charter it endorsed
(:mod:`carbonfed.privacy.charter`), its own signing key (:mod:`carbonfed.privacy.signing`) and
the tag key of the run's check slots (:mod:`carbonfed.privacy.binding`: keyed with the key
holders' secret HE key in HE runs, with the charter alone without HE).

Guarantees
----------
* :meth:`Signer.refusal` is the charter's own check of a request (its run config, round and
  the contributions of each aggregate it carries): a run config that differs from the charter
  in any setting it fixes, such as a lowered ``min-train-clients``, is refused.
* :meth:`Signer.tag` puts this client's tag for (kind, round) into every check slot of an
  upload; :meth:`Signer.check` accepts a received aggregate only if its check slots carry exactly
  the tags of the contributions the server says it sums, each contributor a training client of
  the charter named once per part, every part of at least ``min-train-clients`` contributions,
  and their number the number of terms the server claims. Otherwise :class:`RequestRefused`.
* :meth:`Signer.sign` signs a statement after the client's chain (:mod:`carbonfed.privacy.statements`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from carbonfed.privacy.binding import KINDS, BindingError, check_aggregate, slot_tag, tag_checks
from carbonfed.privacy.charter import Charter, refusal
from carbonfed.privacy.statements import sign_facts

Part = tuple[str, int, tuple[str, ...]]


class RequestRefused(RuntimeError):
    """A request this client must refuse under its charter (the message says why)."""


def parse_parts(text: str | None, what: str) -> list[Part]:
    """The ``[[kind, round, [client, ...]], ...]`` of a request's ``*-parts`` entry."""
    try:
        raw = json.loads(text) if text else None
        parts = [(str(k), int(r), tuple(str(c) for c in clients)) for k, r, clients in raw]
    except (TypeError, ValueError) as exc:
        raise RequestRefused(f"the request does not say which contributions {what} sums ({exc})") from exc
    if not parts:
        raise RequestRefused(f"the request does not say which contributions {what} sums")
    return parts


@dataclass(frozen=True)
class Signer:
    """One client's charter, signing key and tag key (``modulus``: the plain modulus t)."""

    charter: Charter
    client: str
    key: Ed25519PrivateKey
    tag_key: bytes
    modulus: int

    def refusal(self, run_config: dict, rnd: int | None = None, model_terms: int | None = None,
                stats_terms=()) -> str | None:
        """Why the charter forbids this request, or None."""
        return refusal(self.charter, self.client, run_config, rnd, model_terms, stats_terms)

    def tag(self, vec: np.ndarray, kind: str, rnd: int) -> np.ndarray:
        """A freshly packed vector with every check slot set to this client's tag of (kind, round)."""
        return tag_checks(vec, slot_tag(self.tag_key, self.client, kind, rnd, self.modulus))

    def _parts_problem(self, parts: list[Part], terms: int) -> str | None:
        roles = self.charter.roles
        for kind, rnd, clients in parts:
            if kind not in KINDS:
                return f"an aggregate part of unknown kind {kind!r}"
            strangers = [c for c in clients if roles.get(c) != "train"]
            if strangers or len(set(clients)) != len(clients):
                return (f"the {kind} of round {rnd} names {strangers[0]!r}, not a training client of the charter"
                        if strangers else f"the {kind} of round {rnd} names a contributor twice")
            if len(clients) < self.charter.min_train_clients:
                return (f"the {kind} of round {rnd} sums {len(clients)} contribution(s), below the charter's "
                        f"min-train-clients={self.charter.min_train_clients}")
        if sum(len(c) for *_, c in parts) != terms:
            return f"the server says {terms} terms but names {sum(len(c) for *_, c in parts)} contributions"
        return None

    def check(self, name: str, vec: np.ndarray, parts: list[Part], terms: int) -> np.ndarray:
        """``vec`` (the decrypted aggregate ``name``) with its check slots reset to its number of
        contributions, if it is the sum of ``parts``; else :class:`RequestRefused`."""
        why = self._parts_problem(parts, terms)
        if why:
            raise RequestRefused(f"{self.client} refuses {name}: {why}")
        try:
            return check_aggregate(name, vec, self.tag_key, parts, self.modulus)
        except BindingError as exc:
            raise RequestRefused(f"{self.client} refuses {exc}") from exc

    def sign(self, chain: dict | None, kind: str, rnd: int, facts: dict, **kw) -> dict:
        """This client's statement of ``facts`` after ``chain`` (None-valued facts left out)."""
        facts = {k: v for k, v in facts.items() if v is not None}
        return sign_facts(self.key, chain, charter=self.charter.sha256, client=self.client, kind=kind, rnd=rnd,
                          facts=facts, **kw)
