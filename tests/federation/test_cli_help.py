"""Every command's ``--help`` gives every option one line of meaning and its default, and a bad
argument to any command is one line on stderr with exit code 2 and no traceback (nothing runs).
A folder that does not exist or holds no run is a user error for ``report``, ``verify`` and
``audit-attack`` alike: one line, exit code 2."""

from __future__ import annotations

import pytest

from carbonfed.federation.cli import COMMANDS, main

# every command (and sub-command) that has options of its own, with how many it has at least
HELP = {("run",): 25, ("keygen",): 20, ("sweep",): 25, ("report",): 5, ("verify",): 6, ("deploy", "local"): 25,
        ("audit-attack",): 4, ("bench", "he"): 5}


def cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:            # --help and argparse's errors end with SystemExit
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def option_blocks(text: str) -> dict[str, str]:
    """Option name → its whole help text (continuation lines joined), from a --help page."""
    blocks, name = {}, None
    for line in text.split("options:", 1)[1].splitlines():
        if line.startswith("  -"):
            name = line.split()[0].rstrip(",")
            blocks[name] = line
        elif name and line.startswith("      "):
            blocks[name] += " " + line.strip()
        else:
            name = None
    return blocks


def test_every_command_is_covered():
    assert {words[0] for words in HELP} == set(COMMANDS)


@pytest.mark.parametrize("words", HELP, ids=" ".join)
def test_help_gives_every_option_a_meaning_and_a_default(capsys, words):
    code, out, _ = cli(capsys, *words, "--help")
    assert code == 0
    blocks = option_blocks(out)
    assert len(blocks) >= HELP[words], sorted(blocks)
    for name, text in blocks.items():
        if name == "-h":
            continue
        meaning = text.split()[1:]
        if meaning and (meaning[0].isupper() or meaning[0].startswith("{")):     # the option's metavar
            meaning = meaning[1:]
        assert len(meaning) >= 4, f"{' '.join(words)} {name}: no meaning: {text}"
        assert "default" in text or "required" in text, f"{' '.join(words)} {name}: no default: {text}"


@pytest.mark.parametrize("argv, needle", [
    (["sweep", "--epsilons", "3", "--seeds", "0", "--out", "x", "--bogus"], "unrecognized arguments: --bogus"),
    (["sweep", "--epsilons", "3"], "required: --seeds, --out"),
    (["sweep", "--epsilons", "3", "--seeds", "0", "--out", "x", "--rounds", "two"], "--rounds: invalid int value"),
    (["report"], "required: DIR"),
    (["report", "x", "--bogus"], "unrecognized arguments: --bogus"),
    (["verify"], "required: DIR"),
    (["verify", "x", "--rel-tol", "lots"], "--rel-tol: invalid float value"),
    (["deploy"], "required: WHERE"),
    (["deploy", "remote"], "invalid choice: 'remote'"),
    (["deploy", "local", "--clients", "3", "--bogus"], "unrecognized arguments: --bogus"),
    (["deploy", "local"], "required: --clients"),
    (["audit-attack"], "required: DIR"),
    (["audit-attack", "x", "--canaries", "many"], "--canaries: invalid int value"),
    (["bench", "he", "--bogus"], "unrecognized arguments: --bogus"),
    (["bench", "he", "--params", "x"], "--params: invalid int value"),
    (["bench", "he", "--params", "0"], "--params and --clients must be >= 1"),
    (["bench", "gpu"], "invalid choice: 'gpu'"),
])
def test_a_bad_argument_is_one_line_and_exit_2(capsys, tmp_path, monkeypatch, argv, needle):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capsys, *argv)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "error:" in lines[0] and needle in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == []                      # nothing ran, nothing was made


@pytest.mark.parametrize("command", ["report", "verify", "audit-attack"])
def test_a_missing_or_foreign_folder_is_one_line_and_exit_2(capsys, tmp_path, command):
    code, out, err = cli(capsys, command, tmp_path / "nonexistent")
    assert code == 2 and out == "" and err.count("\n") == 1 and "Traceback" not in err
    assert f"{command}: error: {tmp_path / 'nonexistent'}" in err
    (tmp_path / "notes.txt").write_text("not a run")
    code, out, err = cli(capsys, command, tmp_path)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert f"{tmp_path} holds no run" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
