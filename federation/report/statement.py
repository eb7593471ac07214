"""privacy_statement.md: what a run's privacy guarantee is, generated from the run's own records.

Every number in the statement comes from one of these, and from nowhere else:

* ``ledger.jsonl``: each client's ε per round, its accountant history, the mechanism it reported
  (σ, q, steps), refusals, rejections, upload sizes, the round summaries;
* ``server.json``: the config the server ran with, its SHA-256, HE parameters, key fingerprint,
  rounds completed, accepted-contribution counts;
* ``report.json`` (:func:`carbonfed.federation.report.build.build_report`): accuracy and macro-F1 per round, the
  data set's SHA-256, the decrypted sample total;
* the :class:`carbonfed.privacy.audit.verify.VerifyResult` of the same run (chain check, PLD recomputation);
* the code that ran, where a value is a property of the code rather than of the run (the
  statistics-release sensitivity is read from :class:`carbonfed.privacy.stats_release.StatsLayout`, the PRV
  error bound from :mod:`carbonfed.privacy.accountant`), and the environment that builds the statement
  (git commit, library versions), each labelled as such.

The statement is built as structured sections (:func:`statement_sections`) so that the HTML
report (:mod:`carbonfed.federation.report.html`) renders the very same content. Where the parts are:

* :mod:`carbonfed.federation.report.facts`: the facts, collected from the records above;
* :mod:`carbonfed.federation.report.privacy_sections`: summary, unit, guarantee, accounting,
  mechanism, budget, coverage;
* :mod:`carbonfed.federation.report.run_sections`: trust and encryption, randomness, plaintext,
  accuracy, provenance;
* :mod:`carbonfed.federation.report.markup`: markdown and HTML rendering;
* :mod:`carbonfed.privacy.audit.maths`: the μ-GDP and group-privacy formulas.
"""

from __future__ import annotations

from pathlib import Path

from carbonfed.federation.report.audit_sections import claims_comment
from carbonfed.federation.report.blocks import Section
from carbonfed.federation.report.facts import collect_facts
from carbonfed.federation.report.markup import render_markdown
from carbonfed.federation.report.privacy_sections import privacy_sections
from carbonfed.federation.report.run_sections import run_sections

STATEMENT_FILE = "privacy_statement.md"


def statement_sections(facts: dict) -> list[Section]:
    """The statement's sections, in order: the privacy sections, then the system and results sections."""
    return privacy_sections(facts) + run_sections(facts)


def statement_title(facts: dict) -> str:
    cfg = facts["cfg"]
    return f"Privacy statement: {cfg.dataset}, {cfg.privacy}, run {facts['run_name']}"


def statement_markdown(facts: dict) -> str:
    """The whole privacy_statement.md text of these facts (ending with its machine-readable claims)."""
    return render_markdown(statement_title(facts), statement_sections(facts)) + claims_comment(facts.get("claims")) + "\n"


def write_privacy_statement(run_dir, report: dict, verify_result, baseline: dict | None = None) -> Path:
    """Write ``run_dir/privacy_statement.md`` from the run's ledger, server.json and report.json."""
    facts = collect_facts(run_dir, report, verify_result, baseline)
    path = Path(run_dir) / STATEMENT_FILE
    path.write_text(statement_markdown(facts), encoding="utf-8")
    return path
