"""What a run's clients signed, and the aggregate files bound to it, as the key holders' report reads them.

The report states each client's ε from the client's own last signed statement (never from a
line the server wrote), and decrypts an aggregate file only after checking that its check slots
carry the tags of the contributions the ledger accepted for it (:mod:`carbonfed.privacy.binding`).

Guarantees
----------
* :func:`load_run_charter` returns the run's charter only if every client's endorsement verifies
  (ValueError naming the problem otherwise, and for a run folder without ``charter.json``).
* :func:`signed_epsilons` is each client's ε as its last statement carrying an accountant history
  states it, over the statements whose signatures verify, in chain order: what
  ``carbonfed verify`` re-accounts and checks the documents against.
* :meth:`BoundAggregates.open` gives a decrypted aggregate with its number of contributions, or
  raises :class:`~carbonfed.privacy.binding.BindingError` naming the file: missing, unreadable,
  or holding another aggregate (a swapped, stale or forged file; which one, where it can tell).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from carbonfed.privacy.audit.histories import num
from carbonfed.privacy.audit.signed import check_chain, claims_of, read_statements
from carbonfed.privacy.binding import BindingError, Expected, check_aggregate, expected_aggregates
from carbonfed.privacy.charter import CHARTER_FILE, Charter, check_charter


def load_run_charter(run: str | Path) -> Charter:
    """The charter in ``run/charter.json``, every endorsement checked."""
    path = Path(run) / CHARTER_FILE
    if not path.is_file():
        raise ValueError(f"{path} not found: the run is not signed by its clients (no charter)")
    res = check_charter(json.loads(path.read_text()), where=str(path))
    if res.charter is None or res.problems:
        raise ValueError("; ".join(res.problems))
    return res.charter


def signed_epsilons(records: list[dict], charter: Charter) -> dict[str, float]:
    """Client → ε of its last signed statement that carries an accountant history."""
    problems: list[str] = []
    hashes: dict[int, str] = {}
    per = read_statements(records, charter, problems, [0], hashes)
    out = {}
    for who, items in sorted(per.items()):
        claims = claims_of(who, check_chain(who, items, problems, [], hashes))
        eps = [num(c.facts.get("epsilon")) for c in claims if isinstance(c.facts.get("history"), list)]
        if eps and eps[-1] is not None:
            out[who] = eps[-1]
    return out


@dataclass
class BoundAggregates:
    """The aggregate files a run must hold (from its ledger and charter) and the key to read their tags."""

    run: Path
    tag_key: bytes
    modulus: int
    expected: dict[str, Expected] = field(default_factory=dict)

    @classmethod
    def of(cls, run: Path, records: list[dict], charter: Charter, tag_key: bytes, modulus: int) -> "BoundAggregates":
        return cls(run, tag_key, modulus, {e.name: e for e in expected_aggregates(records, charter)})

    def __contains__(self, name: str) -> bool:
        return name in self.expected

    def open(self, name: str, decrypt) -> tuple[np.ndarray, int]:
        """(``aggregates/name`` decrypted with ``decrypt(bytes)`` and checked, its contributions)."""
        where = f"aggregates/{name}"
        e = self.expected.get(name)
        if e is None:
            raise BindingError(f"{where}: the ledger accepted no contribution to it")
        path = self.run / "aggregates" / name
        if not path.is_file():
            raise BindingError(f"{where} is missing: the ledger accepted {e.label()} (line(s) {list(e.lines[:5])})")
        try:
            vec = decrypt(path.read_bytes())
        except ValueError as exc:
            raise BindingError(f"{where}: not a ciphertext of this run ({exc})") from exc
        candidates = {x.label(): x.parts for x in self.expected.values() if x.name != name}
        return check_aggregate(where, vec, self.tag_key, e.parts, self.modulus, candidates), e.terms
