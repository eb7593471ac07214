"""The mask streams of a run (issue 22): which uploads are masked, among whom, under which name.

A run masks three kinds of upload, each in its own *stream*, a separate instance of the mask
protocol (:mod:`carbonfed.privacy.masks`) with its own run label, roster and round numbers:

* ``update``  the training clients' model updates, round ``r`` = the training round (label: the
  charter's SHA-256, as before streams existed);
* ``stats``   the training clients' statistics releases at the setup, round ``k`` = the stage
  (``stats``, ``stats2``, ``stats3``; label ``<sha256>/stats``);
* ``metrics`` the held-out clients' evaluation counts, round ``r`` = the training round (label
  ``<sha256>/metrics``).

Guarantees
----------
* Domain separation: the label goes into every key a client derives
  (:func:`~carbonfed.privacy.mask_client.mask_root`: agreement key, self-mask secrets, hence the
  pair keys) and into every signed mask message, so no seed, share or message of one stream
  opens, cancels or replays in another.
* Both sides derive a stream's roster and plan from the charter and the config alone
  (:func:`stream_roster`, :func:`stream_plan`); a group of fewer than two clients has no plan
  (``None``): a single client's upload *is* the sum, there is nothing to hide it among.
"""

from __future__ import annotations

from carbonfed.privacy.masks import MaskPlan, plan_masks

STREAMS = ("update", "stats", "metrics")
_ROLE = {"update": "train", "stats": "train", "metrics": "test"}


def stream_of(kind: str) -> str:
    """The stream of an upload ``kind``: ``update``, ``stats``/``stats2``/``stats3``, ``metrics``."""
    if kind.startswith("stats"):
        return "stats"
    if kind not in _ROLE:
        raise ValueError(f"no mask stream for uploads of kind {kind!r}")
    return kind


def stream_role(stream: str) -> str:
    """The charter role of the clients of ``stream``."""
    return _ROLE[stream]


def stream_run(run: str, stream: str) -> str:
    """The run label of ``stream`` (``run``: the charter's SHA-256)."""
    if stream not in _ROLE:
        raise ValueError(f"unknown mask stream {stream!r}")
    return run if stream == "update" else f"{run}/{stream}"


def stream_roster(charter, stream: str) -> list[str]:
    """The clients of ``stream``: the charter's clients of its role, sorted (a fresh list)."""
    key = (charter.sha256, stream)        # memoised: the SHA-256 names the charter's body
    if key not in _ROSTERS:
        if len(_ROSTERS) >= 64:
            _ROSTERS.clear()
        _ROSTERS[key] = tuple(sorted(c for c, role in charter.roles.items() if role == _ROLE[stream]))
    return list(_ROSTERS[key])


_ROSTERS: dict[tuple[str, str], tuple[str, ...]] = {}


def stream_plan(cfg, charter, stream: str) -> MaskPlan | None:
    """The plan of ``stream`` (``mask-neighbours`` each; every other one if 0 or at least as many
    as there are), or None for fewer than two clients."""
    n = len(stream_roster(charter, stream))
    if n < 2:
        return None
    return plan_masks(n, cfg.mask_neighbours or None)
