"""The sweep's outputs: ``sweep.csv``, ``tradeoff.png`` and ``tradeoff.md`` from its table of runs.

Guarantees
----------
* :func:`summary` has one row per (mode, ε): centralized first, then ε from ∞ down; ``n`` counts
  the seeds, mean/std/min/max are over them, ``epsilon_max`` is the worst over them.
* :func:`write_outputs` writes the three files from the table alone plus each run's ``report.json``
  (for the provenance); it reruns nothing.
* ``tradeoff.md`` names every run with its config hash and the data's SHA-256, so each figure can
  be traced to the runs behind it.
"""

from __future__ import annotations

import json
import math
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from carbonfed.federation.config import RunConfig
from carbonfed.federation.experiments.sweep_plan import CENTRALIZED, INF, PLAIN_OF, Job, format_eps


def write_outputs(df, out: Path, jobs: list[Job], settings: dict) -> None:
    """``out/sweep.csv`` (the table), ``out/tradeoff.png`` and ``out/tradeoff.md``."""
    df.to_csv(out / "sweep.csv", index=False)
    plot_tradeoff(df, out / "tradeoff.png")
    (out / "tradeoff.md").write_text(tradeoff_markdown(df, out, jobs, settings))


def summary(df):
    """Per (mode, ε): n, mean/std/min/max of accuracy and macro-F1, worst ε_max, mean seconds."""
    g = df.groupby(["mode", "epsilon"], sort=False)
    s = g.agg(n=("seed", "count"),
              acc_mean=("accuracy", "mean"), acc_std=("accuracy", "std"),
              acc_min=("accuracy", "min"), acc_max=("accuracy", "max"),
              f1_mean=("macro_f1", "mean"), f1_std=("macro_f1", "std"),
              f1_min=("macro_f1", "min"), f1_max=("macro_f1", "max"),
              epsilon_max=("epsilon_max", "max"), seconds=("seconds", "mean")).reset_index()
    # Centralized first, then by ε from ∞ down.
    s["_c"] = (s["mode"] != CENTRALIZED).astype(int)
    return s.sort_values(["_c", "epsilon", "mode"], ascending=[True, False, True], kind="stable").drop(columns="_c")


def _x_positions(epsilons):
    """Categorical x axis: finite ε ascending, then ∞ at the right."""
    finite = sorted(e for e in set(epsilons) if not math.isinf(e))
    order = finite + ([INF] if any(math.isinf(e) for e in epsilons) else [])
    return {e: i for i, e in enumerate(order)}, [format_eps(e).replace("inf", "∞") for e in order]


def plot_tradeoff(df, path: Path) -> None:
    """``tradeoff.png``: accuracy and macro-F1 against ε, one line per DP mode, the plaintext and centralized references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summary(df)
    fed = s[s["mode"] != CENTRALIZED]
    cent = s[s["mode"] == CENTRALIZED]
    pos, labels = _x_positions(fed["epsilon"].tolist() or [INF])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    dp_modes = [m for m in dict.fromkeys(fed["mode"]) if m in ("dp", "dp+he", "ddp+he")]
    plain_modes = [m for m in dict.fromkeys(fed["mode"]) if m in ("none", "he")]
    for ax, metric, title in ((axes[0], "acc", "accuracy"), (axes[1], "f1", "macro-F1")):
        for i, mode in enumerate(dp_modes):
            # The family: the DP mode at finite ε, its non-DP counterpart at ε = ∞.
            fam = fed[(fed["mode"] == mode) | ((fed["mode"] == PLAIN_OF[mode]) & fed["epsilon"].map(math.isinf))]
            fam = fam.sort_values("epsilon", key=lambda c: c.map(pos))
            x = fam["epsilon"].map(pos).to_numpy()
            mean = fam[f"{metric}_mean"].to_numpy()
            err = [mean - fam[f"{metric}_min"].to_numpy(), fam[f"{metric}_max"].to_numpy() - mean]
            label = f"{mode} (ε = ∞: {PLAIN_OF[mode]})" if (fam["mode"] != mode).any() else mode
            ax.errorbar(x, mean, yerr=err, fmt="o-", capsize=4, color=colors[i % len(colors)], label=label)
        for j, mode in enumerate(plain_modes):
            row = fed[(fed["mode"] == mode) & fed["epsilon"].map(math.isinf)]
            if len(row):
                y = float(row[f"{metric}_mean"].iloc[0])
                ax.axhline(y, ls="--", lw=1, color="0.35", label=f"plaintext FedAvg, ε = ∞ ({mode}): {y:.3f}")
                if mode not in [PLAIN_OF[m] for m in dp_modes]:   # not already drawn as a family's ∞ point
                    ax.errorbar([pos[INF]], [y], yerr=[[y - float(row[f"{metric}_min"].iloc[0])],
                                                      [float(row[f"{metric}_max"].iloc[0]) - y]],
                                fmt="s", capsize=4, color="0.35")
        if len(cent):
            c = cent.iloc[0]
            ax.axhline(c[f"{metric}_mean"], ls="-", lw=1.5, color="black",
                       label=f"centralized (pooled, no privacy): {c[f'{metric}_mean']:.3f}")
            ax.axhspan(c[f"{metric}_min"], c[f"{metric}_max"], color="black", alpha=0.08, lw=0)
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlim(-0.4, len(labels) - 0.6)
        ax.set_xlabel("ε (privacy budget per client, δ = 1e-5)")
        ax.set_ylabel(f"held-out {title}")
        ax.set_title(f"{title} vs ε")
        ax.grid(alpha=0.3)
    n_seeds = df.groupby(["mode", "epsilon"])["seed"].count().max()
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"carbonfed privacy/utility trade-off — mean over {n_seeds} seed(s), bars: min–max", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def _pm(mean, std, n) -> str:
    if mean != mean:   # NaN
        return "—"
    return f"{mean:.4f} ± {std:.4f}" if n > 1 else f"{mean:.4f}"


def tradeoff_markdown(df, out: Path, jobs: list[Job], settings: dict) -> str:
    """``tradeoff.md``: the summary table, then provenance (settings, software, data hash, each run's config hash)."""
    s = summary(df)
    lines = ["# Privacy/utility trade-off", "",
             f"Held-out countries' accuracy and macro-F1 (mean ± sample std over seeds {settings['seeds']}); "
             f"{settings['dataset']} data, {settings['rounds']} rounds. ε_max: the largest ε any client spent "
             "(worst over seeds, δ = 1e-5); seconds: mean per run (federated: server-measured run time; "
             "centralized: training wall time). Figure: `tradeoff.png`.", "",
             "| mode | ε | seeds | accuracy | macro-F1 | ε_max | seconds |", "|---|---|---|---|---|---|---|"]
    for _, r in s.iterrows():
        eps_max = "—" if r["epsilon_max"] != r["epsilon_max"] else f"{r['epsilon_max']:.3f}"
        lines.append(f"| {r['mode']} | {format_eps(r['epsilon']).replace('inf', '∞')} | {int(r['n'])} "
                     f"| {_pm(r['acc_mean'], r['acc_std'], r['n'])} | {_pm(r['f1_mean'], r['f1_std'], r['n'])} "
                     f"| {eps_max} | {r['seconds']:.1f} |")
    lines += ["", "`centralized` is a reference ceiling, not a federated result: the same model trained on the "
              "pooled rows of the training countries (exact pooled standardisation, no DP, no encryption). "
              "ε = ∞ federated rows are the non-DP counterparts (`he` gives exactly the model `none` gives).", ""]

    lines += ["## Provenance", ""]
    versions = []
    for pkg in ("torch", "flwr", "opacus", "tenseal"):
        try:
            versions.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            pass
    lines.append(f"- sweep: epsilons {[format_eps(e) for e in settings['epsilons']]}, seeds {settings['seeds']}, "
                 f"modes {settings['modes']}, rounds {settings['rounds']}, dataset {settings['dataset']}, "
                 f"hidden layers {settings.get('model', RunConfig.hidden)!r}; other settings "
                 + (", ".join(f"{k}={v!r}" for k, v in sorted(settings.get("overrides", {}).items()) if k != "hidden")
                    or "RunConfig defaults"))
    lines.append(f"- software: {', '.join(versions)}; written {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    data_lines, run_lines = set(), []
    for job in jobs:
        rep = json.loads((out / "runs" / job.name / "report.json").read_text())
        prov = rep.get("provenance", {})
        data = prov.get("data", {})
        data_lines.add(f"- data: `{Path(str(data.get('path', '?'))).name}` sha256 `{data.get('sha256', '?')}`")
        run_lines.append(f"| `runs/{job.name}` | `{prov.get('config_sha256', '?')}` |")
    lines += sorted(data_lines)
    lines += ["", "Config hash of each run (`provenance.config_sha256` of its `report.json`; federated runs: "
              "`RunConfig.digest()`, centralized: SHA-256 of its training settings):", "",
              "| run | config_sha256 |", "|---|---|", *run_lines, ""]
    return "\n".join(lines)
