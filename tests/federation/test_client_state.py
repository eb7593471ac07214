"""A client's durable state is written once per change: a flush that changes nothing writes
nothing (the file is not even replaced), a change is on disk when the key is set, and a state
loaded from its file writes nothing until it changes."""

from __future__ import annotations

import json

from flwr.app import Context, RecordDict

from carbonfed.federation.client.state import PersistentState, load_state, save_state


def _context() -> Context:
    return Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})


def test_a_state_is_written_once_per_change(tmp_path):
    path = tmp_path / "s.json"
    st = PersistentState({}, path)
    st["accountant"] = {"noise_multiplier": [1.0], "sample_rate": [0.2], "steps": [5]}    # on disk at once
    assert json.loads(path.read_text())["accountant"]["steps"] == [5]
    inode = path.stat().st_ino
    st.flush()                                        # nothing changed: the file is not replaced
    save_state(_context(), st)
    assert path.stat().st_ino == inode
    dict.__setitem__(st, "chain", {"seq": 1, "head": "0" * 64})    # set without a write (a statement) ...
    save_state(_context(), st)                                     # ... is written before the reply
    assert path.stat().st_ino != inode and json.loads(path.read_text())["chain"]["seq"] == 1


def test_a_loaded_state_writes_nothing_until_it_changes(tmp_path):
    path = tmp_path / "s.json"
    PersistentState({}, path)["stats_released"] = True
    inode = path.stat().st_ino
    ctx = _context()
    st = load_state(ctx, path)
    save_state(ctx, st)
    assert path.stat().st_ino == inode and st == {"stats_released": True}
    st["noise_multiplier"] = 1.5
    assert json.loads(path.read_text()) == {"noise_multiplier": 1.5, "stats_released": True}
    assert json.loads(ctx.state.config_records["carbonfed"]["json"]) == {"stats_released": True}   # until saved
    save_state(ctx, st)
    assert json.loads(ctx.state.config_records["carbonfed"]["json"]) == {"noise_multiplier": 1.5,
                                                                          "stats_released": True}
