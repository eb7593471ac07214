"""Which countries train and which only evaluate.

Rule (deterministic, no randomness): sort the country names with Python
``sorted``; the countries at indices ``holdout_offset, holdout_offset + 5, ...``
are test (evaluation-only) clients, the rest are train clients. The five offsets
0..4 give disjoint test sets that together cover every country (a 5-fold split
by client). With the seed set's 164 countries, offset 0 gives 33 test and 131
train clients.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from carbonfed.data.errors import UnknownCountryError

HOLDOUT_STRIDE = 5


@dataclass(frozen=True)
class Partition:
    """Train/test roles of the clients.

    Guarantees: ``train`` and ``test`` are sorted, disjoint tuples; partition ids
    index ``sorted(train + test)``.
    """

    train: tuple[str, ...]
    test: tuple[str, ...]
    holdout_offset: int

    def __post_init__(self) -> None:
        _check_offset(self.holdout_offset)
        object.__setattr__(self, "train", tuple(sorted(self.train)))
        object.__setattr__(self, "test", tuple(sorted(self.test)))
        overlap = sorted(set(self.train) & set(self.test))
        if overlap:
            raise ValueError(f"countries cannot be both train and test: {overlap[:5]}")

    @property
    def countries(self) -> tuple[str, ...]:
        """All clients, sorted; position = partition id."""
        return tuple(sorted(self.train + self.test))

    def role(self, country: str) -> str:
        """"train" or "test"; UnknownCountryError (a KeyError) if not in the partition."""
        if country in self.test:
            return "test"
        if country in self.train:
            return "train"
        raise UnknownCountryError(f"country {country!r} is in neither the train nor the test clients")

    def country_of(self, partition_id: int) -> str:
        """Country with index ``partition_id`` in ``sorted(train + test)``; IndexError if out of range."""
        countries = self.countries
        if not 0 <= partition_id < len(countries):
            raise IndexError(f"partition_id {partition_id} out of range 0..{len(countries) - 1}")
        return countries[partition_id]


def split_countries(countries: Iterable[str], holdout_offset: int = 0) -> Partition:
    """Split ``countries`` by the stride-5 rule above.

    Raises:
        ValueError: ``holdout_offset`` not an integer in 0..4, or duplicate country names.
    """
    _check_offset(holdout_offset)
    ordered = sorted(countries)
    if len(set(ordered)) != len(ordered):
        dupes = sorted({c for c in ordered if ordered.count(c) > 1})
        raise ValueError(f"country names must be unique, repeated: {dupes[:5]}")
    test = tuple(ordered[holdout_offset::HOLDOUT_STRIDE])
    test_set = set(test)
    train = tuple(c for c in ordered if c not in test_set)
    return Partition(train=train, test=test, holdout_offset=holdout_offset)


def _check_offset(holdout_offset: int) -> None:
    if isinstance(holdout_offset, bool) or not isinstance(holdout_offset, int) \
            or not 0 <= holdout_offset < HOLDOUT_STRIDE:
        raise ValueError(
            f"holdout_offset must be an integer in 0..{HOLDOUT_STRIDE - 1} "
            f"(which of every {HOLDOUT_STRIDE} sorted countries is held out), got {holdout_offset!r}"
        )
