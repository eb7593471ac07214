"""The installed package: one import name, and the layering rules CI enforces."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_top_level_package_other_than_carbonfed(tmp_path):
    """Run from an empty folder (so the checkout is not on sys.path): the old top-level names
    `data`, `models`, `privacy` and `federation` are not importable, the carbonfed ones are."""
    code = ("import importlib.util as u; "
            "print([n for n in ('data', 'models', 'privacy', 'federation') if u.find_spec(n)]); "
            "print([n for n in ('carbonfed.data', 'carbonfed.models', 'carbonfed.privacy', 'carbonfed.federation') "
            "if u.find_spec(n)])")
    # PYTHONPATH is dropped: an earlier in-process simulation sets it to this process's sys.path
    # for Ray's workers (as Flower does), and pytest puts the checkout on sys.path.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    shadowed, ours = out.stdout.splitlines()
    assert shadowed == "[]"
    assert ours.count("carbonfed.") == 4


def test_layout_check_passes_and_fails_on_a_violation(tmp_path):
    """`.ci/check_layout.py` passes on the tree, and flags a lower floor importing a higher one."""
    ok = subprocess.run([sys.executable, str(ROOT / ".ci" / "check_layout.py")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout[-2000:]
    sys.path.insert(0, str(ROOT / ".ci"))
    try:
        import check_layout
    finally:
        sys.path.pop(0)
    bad = tmp_path / "data" / "probe.py"
    bad.parent.mkdir()
    bad.write_text("from carbonfed.privacy.he import HEParams\n\n\ndef f():\n    import carbonfed.federation.config\n")
    problems = check_layout.check_file(bad, root=tmp_path)
    assert any("lower floor importing a higher one" in p for p in problems)
    assert any("inside f()" in p for p in problems)
