"""report.html: one self-contained page per run (plots embedded as base64 PNG, no external assets).

:func:`write_all` writes ``report.html`` and ``privacy_statement.md`` beside a run's
``report.json``, from its audit (:func:`carbonfed.privacy.audit.verify.verify_run`); ``carbonfed run``
and ``carbonfed report`` (:mod:`carbonfed.federation.report_command`) call it through
:func:`carbonfed.federation.run.write_results`. A failed audit is shown at the top of the page.

The page shows the same content as the privacy statement (:mod:`carbonfed.federation.report.statement` builds both
from one set of sections), plus a headline and two plots: each client's ε after every round,
from the ledger, and held-out accuracy / macro-F1 per round, from report.json.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from carbonfed.federation.report.audit_sections import banner_html, claims_comment, empirical_html
from carbonfed.federation.report.facts import collect_facts
from carbonfed.federation.report.markup import inline_html, render_html_sections
from carbonfed.federation.report.statement import STATEMENT_FILE, statement_markdown, statement_sections, statement_title

HTML_FILE = "report.html"

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: #1d2330;
       background: #f6f7f9; margin: 0; line-height: 1.45; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 32px 64px; background: #fff; }
h1 { font-size: 1.6em; margin: 0 0 4px; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 2px solid #e3e6eb;
     padding-bottom: 4px; }
.sub { color: #5b6372; margin: 0 0 18px; font-size: .95em; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 16px 0; }
.card { box-sizing: border-box; flex: 1 1 110px; border: 1px solid #dde1e7; border-radius: 8px; padding: 10px 14px; background: #fafbfc; }
.card .k { font-size: .85em; color: #5b6372; letter-spacing: .02em; }
.card .v { font-size: 1.35em; font-weight: 600; margin-top: 2px; white-space: nowrap; }
.card.ok { border-color: #2e7d32; background: #edf7ee; } .card.ok .v { color: #2e7d32; }
.card.bad { border-color: #c62828; background: #fdecea; } .card.bad .v { color: #c62828; }
.banner { border: 2px solid #c62828; background: #fdecea; color: #8e1b1b; border-radius: 8px; padding: 12px 16px; }
.banner.ok { border-color: #2e7d32; background: #edf7ee; color: #1b5e20; }
table { border-collapse: collapse; width: 100%; font-size: .88em; margin: 8px 0 12px; }
th, td { border: 1px solid #dde1e7; padding: 4px 8px; text-align: left; vertical-align: top; }
thead th { background: #eef1f5; position: sticky; top: 0; }
tbody tr:nth-child(even) { background: #fafbfc; }
.scroll { max-height: 420px; overflow-y: auto; border: 1px solid #dde1e7; }
.scroll table { margin: 0; }
code { font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: .9em; background: #f0f2f5;
       padding: 0 3px; border-radius: 3px; word-break: break-all; }
figure { margin: 12px 0; } figure img { width: 100%; max-width: 1000px; border: 1px solid #e3e6eb; }
figcaption { color: #5b6372; font-size: .9em; }
footer { margin-top: 32px; color: #5b6372; font-size: .85em; }
"""


# -- plots ----------------------------------------------------------------------------------------

def _png(fig) -> str:
    """The figure as an embeddable data URI; closes the figure."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _plot_epsilon(facts: dict) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = facts["cfg"]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    series = {w: p["series"] for w, p in facts["per_client"].items() if p["series"]}
    if not cfg.dp or not series:
        ax.text(0.5, 0.5, f"mode '{cfg.privacy}': no DP, ε = ∞", ha="center", va="center", fontsize=16,
                color="#c62828", transform=ax.transAxes)
        ax.set_axis_off()
        return _png(fig)
    cmap = plt.get_cmap("tab20")
    for i, (who, pts) in enumerate(sorted(series.items())):
        xs, ys = zip(*pts)
        ax.plot(xs, ys, lw=0.8, alpha=0.45, color=cmap(i % 20))
    # The largest ε any client holds after each round (its last reported value so far).
    rounds = sorted({r for pts in series.values() for r, _ in pts})
    max_curve = []
    for r in rounds:
        vals = [max((e for rr, e in pts if rr <= r), default=None) for pts in series.values()]
        vals = [v for v in vals if v is not None]
        max_curve.append(max(vals))
    ax.plot(rounds, max_curve, lw=2.6, color="#111", marker="o", label="max over clients")
    ax.axhline(cfg.epsilon, color="#c62828", ls="--", lw=1.4, label=f"target ε = {cfg.epsilon:g}")
    distinct = len({tuple(e for _, e in pts) for pts in series.values()})
    ax.plot([], [], lw=0.8, color=cmap(0), label=f"each client ({len(series)}; {distinct} distinct curve(s))")
    ax.set_xlabel("round (0 = statistics release)")
    ax.set_ylabel(f"ε at δ = {facts['delta']:g} (Opacus PRV)")
    ax.set_xticks(rounds)
    ax.set_ylim(0, max(cfg.epsilon, max(max_curve)) * 1.12)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    ax.set_title("ε per client over rounds (from the ledger)")
    return _png(fig)


def _plot_accuracy(facts: dict) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = [h for h in facts["report"].get("history", []) if h.get("accuracy") is not None]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    if not hist:
        ax.text(0.5, 0.5, "no scored round", ha="center", va="center", fontsize=16, transform=ax.transAxes)
        ax.set_axis_off()
    else:
        xs = [h["round"] for h in hist]
        ax.plot(xs, [h["accuracy"] for h in hist], marker="o", lw=2, color="#1f77b4", label="accuracy")
        ax.plot(xs, [h["macro_f1"] for h in hist], marker="s", lw=2, color="#ff7f0e", label="macro-F1")
        base = facts.get("baseline")
        if base:
            bh = [h for h in base.get("history", []) if h.get("accuracy") is not None]
            bx = [h["round"] for h in bh]
            mode = base.get("privacy_mode")
            ax.plot(bx, [h["accuracy"] for h in bh], ls="--", marker="o", mfc="none", color="#1f77b4",
                    label=f"accuracy, baseline ({mode})")
            ax.plot(bx, [h["macro_f1"] for h in bh], ls="--", marker="s", mfc="none", color="#ff7f0e",
                    label=f"macro-F1, baseline ({mode})")
        ax.set_xticks(xs)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("round")
        ax.set_ylabel("held-out score")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=9)
    ax.set_title("held-out accuracy and macro-F1 per round (exact, not DP)")
    return _png(fig)


# -- page -----------------------------------------------------------------------------------------

def _card(key: str, value: str, cls: str = "") -> str:
    return (f'<div class="card {cls}"><div class="k">{html.escape(key)}</div>'
            f'<div class="v">{html.escape(value)}</div></div>')


def _fmt(x, spec=".4f") -> str:
    return "—" if x is None else format(float(x), spec)


def render_html(facts: dict) -> str:
    cfg, rep, v = facts["cfg"], facts["report"], facts["verify"]
    m = rep.get("metrics") or {}
    ok = bool(v.get("ok"))
    eps_txt = (f"{_fmt(facts['epsilon_max'])} / {cfg.epsilon:g}" if cfg.dp else "∞ (no DP)")
    arch = (rep.get("model") or {}).get("architecture")
    averaged = (rep.get("model") or {}).get("averaged_rounds") or []
    cards = [_card("data set", cfg.dataset), _card("mode", cfg.privacy),
             *([_card("model", arch.split(" (")[0]
                      + (f", mean of rounds {averaged[0]}–{averaged[-1]}" if len(averaged) > 1 else ""))] if arch else []),
             _card("accuracy", _fmt(m.get("accuracy"))), _card("macro-F1", _fmt(m.get("macro_f1"))),
             _card("ε max / target", eps_txt,
                   "" if not cfg.dp else ("ok" if (facts["epsilon_max"] or 0) <= cfg.epsilon else "bad")),
             _card("δ", f"{facts['delta']:g}" if cfg.dp else "—"),
             _card("verified", "yes" if ok else "NO", "ok" if ok else "bad")]
    banner = banner_html(v) + claims_comment(facts.get("claims"))   # the verdict; the claims verify checks
    banner += empirical_html(((facts["report"] or {}).get("audit") or {}).get("empirical"))   # audit-attack's
    sections = statement_sections(facts)
    base_note = ("" if facts.get("baseline") else " No baseline run given.")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(statement_title(facts).replace("Privacy statement", "carbonfed report"))}</title>
<style>{_CSS}</style></head>
<body><main>
<h1>carbonfed run report: {html.escape(facts['run_name'])}</h1>
<p class="sub">{html.escape(facts['run_dir'])} · {rep['clients']['train']} training and {rep['clients']['test']} held-out
countries · {facts['rounds_completed']} of {cfg.rounds} rounds · generated from ledger.jsonl, server.json and report.json</p>
<div class="cards" id="headline">{''.join(cards)}</div>
{banner}
<section id="sec-plots"><h2>Plots</h2>
<figure><img id="plot-epsilon" alt="epsilon per client over rounds" src="{_plot_epsilon(facts)}">
<figcaption>Each client's ε after every request, from the ledger (thin lines; identical curves overlap), the
largest ε over clients (bold) and the target (dashed).</figcaption></figure>
<figure><img id="plot-accuracy" alt="accuracy and macro-F1 over rounds" src="{_plot_accuracy(facts)}">
<figcaption>Held-out accuracy and macro-F1 per round from the decrypted confusion matrices
(report.json).{inline_html(base_note)}</figcaption></figure>
</section>
{render_html_sections(sections)}
<footer>Same content as <code>{STATEMENT_FILE}</code> in the run directory. Built by
<code>federation/report/html.py</code>; self-contained (no external assets).</footer>
</main></body></html>
"""


def write_html_report(run_dir, report: dict, verify_result, baseline: dict | None = None) -> Path:
    """Write ``run_dir/report.html`` (self-contained) and return its path."""
    facts = collect_facts(run_dir, report, verify_result, baseline)
    path = Path(run_dir) / HTML_FILE
    path.write_text(render_html(facts), encoding="utf-8")
    return path


def write_all(run_dir, report: dict, verify_result, baseline: dict | None = None) -> tuple[Path, Path]:
    """report.html and privacy_statement.md from one fact collection (both from the same records)."""
    facts = collect_facts(run_dir, report, verify_result, baseline)
    run = Path(run_dir)
    stmt = run / STATEMENT_FILE
    stmt.write_text(statement_markdown(facts), encoding="utf-8")
    page = run / HTML_FILE
    page.write_text(render_html(facts), encoding="utf-8")
    return page, stmt


def load_baseline(path) -> dict:
    """A baseline run's report.json (the run directory or the file itself)."""
    p = Path(path)
    f = p / "report.json" if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(f"baseline: no report.json in {p} (run `carbonfed report {p}` on it first)")
    return json.loads(f.read_text())
