"""The HE keys of a run: the smallest ring its vectors need, and keys made for it.

Every place that makes keys for a run (``carbonfed run``, ``carbonfed keygen``, ``deploy local``,
``sweep``, ``audit-attack``, ``bench/round_time.py``) calls :func:`keygen_for`; the server checks
the keys it loads against the same requirement
(:func:`carbonfed.federation.server.app.build_strategy`).

Guarantees
----------
* :func:`he_requirement` is ``(longest vector, most ciphertexts summed)`` over every config given
  (:attr:`~carbonfed.federation.client.participant.Layouts.he_requirement`), computed from the
  data set's public schema (:func:`carbonfed.federation.run_data.data_schema`), without reading data.
* :func:`he_params_for` is :func:`carbonfed.privacy.he_ring.ring_for` of that requirement: the
  smallest ring at 128-bit security whose sums of the run's vectors decrypt exactly, so keys of
  it pass the server's ``check_ring`` for each of the configs (a sweep's shared key pair serves
  every one of its jobs).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from carbonfed.federation.client.participant import Layouts
from carbonfed.federation.config import RunConfig
from carbonfed.federation.run_data import data_schema
from carbonfed.privacy.he import HEParams, keygen
from carbonfed.privacy.he_ring import ring_for


def _configs(cfgs: RunConfig | Iterable[RunConfig]) -> list[RunConfig]:
    out = [cfgs] if isinstance(cfgs, RunConfig) else list(cfgs)
    if not out:
        raise ValueError("no run config to make HE keys for")
    return out


def he_requirement(cfgs: RunConfig | Iterable[RunConfig]) -> tuple[int, int]:
    """(slots, terms): the longest vector and the most ciphertexts one aggregate sums, over ``cfgs``."""
    reqs = [Layouts.for_run(c, *data_schema(c)).he_requirement for c in _configs(cfgs)]
    return max(r[0] for r in reqs), max(r[1] for r in reqs)


def he_params_for(cfgs: RunConfig | Iterable[RunConfig]) -> HEParams:
    """The smallest BFV ring that serves every run in ``cfgs`` (one config or several)."""
    return ring_for(*he_requirement(cfgs))


def keygen_for(cfgs: RunConfig | Iterable[RunConfig], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """``secret.ctx`` and ``public.ctx`` of :func:`he_params_for` in ``out_dir`` (both mode 0600)."""
    return keygen(out_dir, he_params_for(cfgs))
