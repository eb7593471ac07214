"""The privacy sections of the statement: summary, unit of privacy, the guarantee, accounting,
mechanism settings, budget policy, and what the guarantee covers and does not.

Guarantees
----------
* Every figure comes from the facts of :func:`carbonfed.federation.report.facts.collect_facts`
  (ledger, server.json, report.json, the audit result); μ-GDP and group privacy are the formulas of
  :mod:`carbonfed.privacy.audit.maths`, stated as approximations or as the weak bounds they are.
* :func:`privacy_sections` returns the sections in the statement's order; each section is a pure
  function of the facts.
"""

from __future__ import annotations

from carbonfed.federation.report.audit_sections import empirical_markdown
from carbonfed.federation.report.blocks import Section, Table, fmt_f4, fmt_g, fmt_range
from carbonfed.privacy.audit.maths import group_privacy


def _summary(f: dict) -> Section:
    cfg, rep, v = f["cfg"], f["report"], f["verify"]
    m = rep.get("metrics") or {}
    items = [f"Data set `{cfg.dataset}`, privacy mode `{cfg.privacy}`, {f['rounds_completed']} of {cfg.rounds} "
             f"planned rounds completed, {rep['clients']['train']} training and {rep['clients']['test']} held-out "
             "clients (one per country)."]
    if cfg.dp:
        acc, again = ("Skellam RDP", "ddp_epsilon") if cfg.ddp else ("Opacus PRV", "dp-accounting PLD")
        items.append(f"**ε_max = {fmt_f4(f['epsilon_max'])}** ({acc}; exact ledger value {f['epsilon_max']!r}) "
                     f"against the target ε = {fmt_g(cfg.epsilon)}, at **δ = {fmt_g(f['delta'])}**, per training client, "
                     "for adding or removing one row of that client's data.")
        items.append(f"Independent recomputation ({again}): ε_max = {fmt_f4(v.get('epsilon_max_recomputed'))}.")
        if f["mu_max"] is not None:
            items.append(f"Gaussian-DP view (central-limit approximation, not a bound): μ ≈ {fmt_f4(f['mu_max'])}.")
    else:
        items.append(f"**No differential privacy** in mode `{cfg.privacy}`: no ε bounds what the outputs reveal "
                     "about any row.")
    items.append(f"Audit (`privacy/audit/verify.py`): **{'passed' if v.get('ok') else 'FAILED'}**"
                 + (f" with {len(v.get('problems', []))} problem(s), listed under Accounting." if not v.get("ok") else "."))
    items += empirical_markdown((rep.get("audit") or {}).get("empirical"))   # the last audit-attack, if any
    items.append(f"Held-out accuracy {fmt_f4(m.get('accuracy'))}, macro-F1 {fmt_f4(m.get('macro_f1'))} (not DP: see below).")
    return Section("summary", "Summary", [items])


def _unit(f: dict) -> Section:
    cfg = f["cfg"]
    pre = [] if cfg.dp else [f"Mode `{cfg.privacy}` has no DP guarantee; the DP modes (`dp`, `dp+he`) of this code "
                             "use the unit and relation below."]
    return Section("unit", "Unit of privacy and neighbouring relation", pre + [
        "The unit of privacy is **one record: one country-year row** of one client's data set (each client "
        "is one country and holds that country's rows, one per year).",
        "Neighbouring data sets differ by **adding or removing one row of one client's data set** (add/remove-one, "
        "as Opacus's Poisson-sampling accounting and dp-accounting's `ADD_OR_REMOVE_ONE`). Each row belongs to "
        "exactly one client, so the guarantee for a row is the ε of the client holding it; ε_max is the guarantee "
        "for every row of every training client.",
        f"A client's row count is treated as public (it sets the update's weight and Opacus's normalisation); "
        f"clients hold at most max-client-samples = {cfg.max_client_samples} rows, and δ = {fmt_g(f['delta'])} "
        f"{'is' if f['delta'] < 1 / cfg.max_client_samples else 'is NOT'} below 1/{cfg.max_client_samples}.",
    ])


def _guarantee(f: dict) -> Section:
    cfg = f["cfg"]
    s = Section("guarantee", "The guarantee")
    if not cfg.dp:
        s.blocks.append(f"Mode `{cfg.privacy}` runs no DP mechanism: there is no (ε, δ) guarantee. The table lists "
                        "the clients the ledger records.")
    else:
        n = sum(1 for p in f["per_client"].values() if p["epsilon"] is not None)
        distinct = len({p["epsilon"] for p in f["per_client"].values() if p["epsilon"] is not None})
        s.blocks.append(f"Each training client's uploads are (ε_c, δ)-DP with **δ = {fmt_g(f['delta'])}** and ε_c as "
                        f"below ({n} clients, {distinct} distinct value(s)); **ε_max = {fmt_f4(f['epsilon_max'])}**, "
                        f"minimum {fmt_f4(f['epsilon_min'])}, target ε = {fmt_g(cfg.epsilon)}.")
        if f["report_mismatch"]:
            s.blocks.append(f"**Discrepancy:** report.json's ε per client differs from the ledger for "
                            f"{', '.join(f['report_mismatch'][:10])}. The ledger values are shown.")
        mu_eps = f["mu_epsilon"]
        if f["mu_max"] is not None:        # ddp+he: Skellam histories, no Gaussian-DP view
            s.blocks.append(
                "The same guarantee as μ-Gaussian DP, by the central-limit approximation of Bu, Dong, Long and Su "
                "(2020): each DP-SGD round is T Poisson-subsampled Gaussian steps with μ = q·sqrt(T·(e^{1/σ²} − 1)); the "
                "unsubsampled statistics release (one per stage) with noise multiplier σ_s is (1/σ_s)-GDP; they compose as "
                f"sqrt(μ₁² + μ₂² + …). **μ_max ≈ {fmt_f4(f['mu_max'])}**, which as (ε, δ) at δ = {fmt_g(f['delta'])} reads "
                f"ε ≈ {fmt_f4(mu_eps)}. This is the CLT approximation, **not a bound** (it can understate the privacy loss "
                "at few steps); the PRV ε above is the figure of record.")
    rows = []
    for who, p in f["per_client"].items():
        rows.append([who, fmt_f4(p["epsilon"]) if cfg.dp else "— (no DP)", fmt_f4(p["recomputed"]),
                     fmt_f4(p["mu"]), str(p["accepted_rounds"]), str(len(p["refused"])), str(p["total_steps"]),
                     str(p["line"] or "—")])
    s.blocks.append(Table(["client", "ε (PRV, ledger)", "ε (PLD, recomputed)", "μ (GDP, CLT approx.)",
                           "rounds accepted", "rounds refused", "total steps", "ledger line"], rows, "epsilon-table"))
    return s


def _accounting(f: dict) -> Section:
    cfg, v, libs = f["cfg"], f["verify"], f["libraries"]
    s = Section("accounting", "Accounting")
    if cfg.ddp:
        s.blocks.append(
            "Each client accounts its own history of Skellam releases (its statistics shares and one release per "
            "round at the noise floor) with the **Skellam RDP accountant** (`privacy/skellam.py`: Agarwal, Kairouz "
            "and Liu 2021, Theorem 3.5; Zhu and Wang 2019, Theorem 5; RDP to (ε, δ) by Balle et al. 2020), which also "
            "calibrated the shares. The independent recomputation below is `privacy/audit/ddp_epsilon.py` (the same "
            "theorems in 60-digit mpmath, converted by dp_accounting), which shares no code with it.")
    elif cfg.dp:
        s.blocks.append(
            f"Each client accounts its own history with the **Opacus PRV accountant** (`{f['accountant']}`, Gopi, "
            f"Lee and Wutschitz 2021; opacus {libs['opacus']} in the environment that generated this statement; the "
            f"run did not record the clients' library versions). The PRV ε is an **upper bound on the true ε up to "
            f"its numerical error eps_error = {fmt_g(f['eps_error'])}** (Opacus returns the upper end of its error "
            "interval). The noise was calibrated with the same accountant.")
    else:
        s.blocks.append("No accountant ran: the mode has no DP mechanism.")
    s.blocks.append(
        f"Independent recomputation, with no key: `privacy/audit/verify.py` re-checked the ledger's hash chain "
        f"({f['ledger_lines']} lines) and re-accounted every client's own signed history with "
        f"**{v.get('accountant', '?')} {v.get('accountant_version', '?')}** (Google's PLD accountant, pessimistic "
        f"estimate, value discretisation {fmt_g(v.get('value_discretization_interval'))}), which shares no code with "
        f"Opacus. Recomputed ε_max = {fmt_f4(v.get('epsilon_max_recomputed'))} vs claimed "
        f"{fmt_f4(v.get('epsilon_max_claimed'))}; budget ε = {fmt_g(v.get('epsilon_budget'))} (the signed charter's). "
        + (f"Client signatures (`privacy/statements.py`): {v.get('statements_checked', 0)} ledger line(s) carry a "
           "statement its client signed with its own Ed25519 key, chained to its previous one, under the charter "
           f"`{str(v.get('charter_sha256'))[:16]}…` that every client endorsed before round 1; the server holds no "
           "client key, so it can neither write nor change nor drop a client's fact unseen. "
           if v.get("signed") else
           "**UNSIGNED**: the run has no charter, so its client facts rest on the server's word alone. ")
        + f"Result: **{'passed' if v.get('ok') else 'FAILED'}**.")
    if v.get("checked") or v.get("not_checked"):
        s.blocks.append([f"checked: {c}" for c in v.get("checked", [])]
                        + [f"**not checked**: {c}" for c in v.get("not_checked", [])])
    if v.get("problems"):
        s.blocks.append("Problems found by the audit:")
        s.blocks.append([p.replace("`", "'") for p in v["problems"]])
    if v.get("notes"):
        s.blocks.append("Audit notes:")
        s.blocks.append([n.replace("`", "'") for n in v["notes"]])
    return s


def _mechanism(f: dict) -> Section:
    cfg = f["cfg"]
    rows = [
        ["DP-SGD", "on" if cfg.dp else "off", "config `privacy`"],
        ["clip norm C (per-sample L2)", fmt_g(cfg.max_grad_norm), "config `max-grad-norm`"],
        ["noise multiplier σ (noise std σ·C)", fmt_range(f["sigmas"]), "ledger, train lines"],
        ["sampling", "Poisson, public rate q = 1/batches-per-epoch", "code: `privacy/dp_sgd.py`"],
        ["sampling rate q", fmt_range(f["sample_rates"]) + f" (config: 1/{cfg.batches_per_epoch})", "ledger, train lines"],
        ["steps per round", fmt_range(f["steps"]) + f" (= local-epochs {cfg.local_epochs} × batches-per-epoch "
                                                 f"{cfg.batches_per_epoch})", "ledger, accepted train lines"],
        ["local epochs", str(cfg.local_epochs), "config"],
        ["rounds", f"{f['rounds_completed']} completed of {cfg.rounds} planned", "server.json"],
        ["clients addressed per round", fmt_range(f["addressed"]) + " (every training client, no client sampling)",
         "ledger"],
        ["updates accepted per round", fmt_range(f["accepted"]), "ledger, round lines"],
        ["statistics release noise multiplier σ_s", fmt_g(cfg.stats_sigma),
         "config `stats-noise-multiplier`" + (" (raised so that the statistics releases spend at most half of ε)"
                                              if cfg.stats_sigma > cfg.stats_noise_multiplier else "")],
        ["statistics releases in the ledger", (", ".join(str(list(m)) for m in f["stats_mechanisms"])
                                               or f"none charged: {f['stats_stages']} exact stage(s), outside ε"),
         "ledger, stats lines ([σ_s, q = 1, 1 step] per stage)"],
        ["statistics release L2 sensitivity Δ per stage", " / ".join(fmt_g(x, 6) for x in f["stats_sensitivity"]),
         f["stats_sensitivity_src"]],
        ["statistics release noise std σ_s·Δ per stage",
         " / ".join(fmt_g(cfg.stats_sigma * x, 6) for x in f["stats_sensitivity"]),
         "derived"],
        ["fixed-point clip of parameters", f"±{fmt_g(cfg.param_clip)}", "config `param-clip` (post-processing)"],
        ["δ", fmt_g(f["delta"]), "ledger" if f["ledger_deltas"] else "config"],
        ["target ε", fmt_g(cfg.epsilon) if cfg.dp else "—", "config `epsilon`"],
    ]
    return Section("mechanism", "Mechanism settings", [Table(["setting", "value", "source"], rows, "mechanism-table")])


def _budget(f: dict) -> Section:
    cfg = f["cfg"]
    if not cfg.dp:
        return Section("budget", "Budget policy", ["No DP budget applies in this mode."])
    refusals = f["refusals"]
    sig_changes = [w for w, p in f["per_client"].items() if len(p["sigmas"]) > 1]
    return Section("budget", "Budget policy", [[
        f"The noise multiplier is calibrated **once**, before the first upload, for the planned {cfg.rounds} rounds "
        f"plus the statistics release(s), so the planned total ε reaches at most ε = {fmt_g(cfg.epsilon)} at "
        f"δ = {fmt_g(f['delta'])}. " + ("Every client reported one σ throughout the run." if not sig_changes else
                                     f"**{len(sig_changes)} client(s) reported more than one σ**: "
                                     + ", ".join(sig_changes[:10]) + "."),
        "Before touching its data in a round, a client computes the ε it would reach after the round and "
        "**refuses the round if that exceeds ε**; it spends nothing and the refusal is recorded in the ledger "
        "(status `refused`, with the reason).",
        f"Refusals in this run: {len(refusals)}" + (": " + ", ".join(f"{c} (round {r})" for c, r in refusals[:20])
                                                   if refusals else "."),
        "The spend of a round is charged to the client's accountant before training, so a round that fails "
        "after training is still counted by the client, which signs the failure with its history (status "
        "`error`); after the last round every client signs its whole history in a closing statement.",
    ]])


def _coverage(f: dict) -> tuple[Section, Section]:
    cfg, rep = f["cfg"], f["report"]
    covered = Section("covered", "What the guarantee covers")
    not_cov = Section("not_covered", "What it does not cover")
    sig_s = cfg.stats_sigma
    if cfg.dp:
        group = group_privacy(f["epsilon_max"] or 0.0, f["delta"], 2)
        covered.blocks.append([
            "**Every upload** of each training client: each round's model update"
            + ((f", and the round-0 statistics releases ({cfg.stats_releases} stages, σ_s > 0)" if cfg.two_stage_stats else
                ", and the round-0 statistics release (σ_s > 0)") if sig_s > 0 else "") + ".",
            "Hence, as post-processing, **every broadcast global model**, the final model (`model.pt`"
            + (f": the mean of the global models of the last {cfg.average_last} rounds, `average-last`" if cfg.average_last > 1 else "")
            + "), and the scaler and class weights derived from the statistics aggregate, for any party that sees them, "
            "including one that decrypts individual ciphertexts.",
            "The composition over the whole run, adaptively (later rounds depend on earlier global models): ε is "
            "accounted over each client's full history, never per round.",
            "Fixed-point clipping, stochastic rounding, encryption and sample weighting are post-processing.",
        ])
    else:
        covered.blocks.append(f"Nothing: mode `{cfg.privacy}` has no DP mechanism.")
    items = [
        f"**Evaluation metrics.** The {rep['clients']['test']} held-out clients' confusion matrices are exact "
        "counts (no noise); their sum is decrypted every round and gives the accuracy and macro-F1 in this "
        "statement. Held-out clients run no DP at all.",
        "**Hyper-parameter tuning** and every choice of configuration made by looking at the data "
        "(e.g. `bench/tune.py`) is not accounted.",
        ("**Preprocessing statistics: NOT covered in this run** (stats-noise-multiplier = 0 or DP off): the "
         "statistics aggregate (class counts, feature means and variances) is exact." if sig_s <= 0 else
         f"Preprocessing statistics are covered in this run (σ_s = {fmt_g(sig_s)} > 0); they would not be with "
         "stats-noise-multiplier = 0."),
        "**Timing and size side channels**: local training time grows with the client's row count (expected "
        "batch n·q); reply sizes" + (f" vary ({f['upload_bytes'][0]}–{f['upload_bytes'][1]} bytes per update in "
                                     "this run)" if f["upload_bytes"] else "") + "; refusals and errors are visible.",
        "**Row counts**: each client's row count is the weight of its update and is treated as public; the total "
        "row count of the accepted clients is readable by every key holder"
        + (f" ({rep['model']['samples']} in this run)" if rep.get("model") else "") + ".",
        "**A country as a whole**: a client's rows are its whole data set; for k rows group privacy gives only "
        "(kε, k·e^{(k−1)ε}·δ)"
        + (f", already ({fmt_f4(group[0])}, {fmt_g(group[1], 3)}) at k = 2" if cfg.dp else "")
        + "; consecutive years of a country are strongly correlated.",
        "**Randomness quality** (see Randomness) and floating-point attacks on Gaussian sampling.",
        "**Malicious parties**: a client that signs a consistent history of mechanisms it did not run, or ignores "
        "its budget; a server that adds terms of its own whose check slots hold 0 (threat_model.md, G7); a party "
        "that rewrites the whole run folder with keys of its own, unless the reviewer anchors the charter "
        "(`carbonfed verify --trusted-keys clients.pub.json` or `--charter-sha256`). The server cannot rewrite "
        "the clients' facts: each is signed by its client.",
    ]
    not_cov.blocks.append(items)
    return covered, not_cov


def _distributed(f: dict) -> Section:
    """``ddp+he``: the central guarantee, the per-upload one and the trust assumption (issue 19)."""
    d = ((f["report"] or {}).get("privacy") or {}).get("ddp") or {}
    wrap = d.get("wrap_probability")
    v = (f["verify"] or {}).get("ddp") or {}
    return Section("distributed", "Distributed DP: whom the guarantee holds against", [
        f"Mechanism: {d.get('mechanism', 'distributed DP-FedSGD')}. Each round every training client Poisson-samples "
        f"its rows at q = {fmt_g(d.get('sample_rate'))}, clips each row's gradient to C = {fmt_g(d.get('clip'))}, "
        f"scales by {fmt_g(d.get('scale'))} and rounds each row (conditional randomized rounding), sums them and adds "
        f"a Skellam share of variance {fmt_g(d.get('share_variance'), 4)}, calibrated so that "
        f"min-noise-clients = {d.get('min_noise_clients', '?')} shares carry the central noise; the server sums "
        "the encrypted integers exactly and a round with fewer contributors is not released. Accounting: "
        f"{d.get('theorem', 'Skellam RDP')}; the wrap probability modulo t over the run is ≤ "
        f"{fmt_g(wrap, 2) if wrap else '1e-300 (it underflows)'}.",
        f"**Central guarantee** (against anyone who sees only aggregates): ε = {fmt_f4(d.get('epsilon_central'))} "
        f"at δ = {fmt_g(d.get('delta'))} for {d.get('rounds_released', '?')} released round(s) "
        f"({fmt_f4(d.get('epsilon_planned'))} planned at the floor, what each client charged); recomputed from the "
        f"signed contributors with no key: ε = {fmt_f4(v.get('epsilon'))}.",
        f"**Per-upload guarantee** (against a party that decrypts one client's ciphertexts: today the server "
        f"together with any one key holder): ε = {fmt_f4(d.get('epsilon_per_upload'))}, each upload carrying only "
        "that client's own share. Clients are assumed honest-but-curious: a client that skips its share weakens "
        "the sum for everyone.",
    ])


_COALITIONS = (("server_alone", "the server alone"),
               ("server_with_fewer_than_t_clients", "the server with fewer than t clients"),
               ("t_or_more_clients", "the server with t or more clients"))


def _other_streams(m: dict) -> str:
    """What the masks block says of the statistics releases and the evaluation counts."""
    st, me = m.get("statistics") or {}, m.get("metrics")
    text = (f"The statistics releases are masked the same way among the training clients: "
            f"{st.get('stages_unmasked', 0)} stage(s) unmasked, {len(st.get('stages_abandoned', []))} not. ")
    if me is None:
        return text + "The evaluation counts are not masked (fewer than two held-out clients: their sum is one client's)."
    return text + (f"The held-out clients' evaluation counts are masked among themselves ({me['clients']} clients, "
                   f"threshold t = {me['threshold']}): {me['rounds_unmasked']} round(s) unmasked, "
                   f"{len(me['rounds_abandoned'])} not; with the server, {me['threshold']} of them can unmask one "
                   "client's counts.")


def _masks(f: dict) -> Section:
    """HE modes: which coalitions see one client's upload, with pairwise masks (issue 22) or without."""
    m = (((f["report"] or {}).get("he") or {}).get("masks")) or None
    title = "Encrypted uploads: who can see one client's update"
    if m is None:
        return Section("masks", title, [
            "Every client holds the BFV secret key and the uploads are not masked (`--masks` is off): the server "
            "alone sees only ciphertexts, but the server together with any one key holder can decrypt every "
            "single upload, which is then protected only by the DP noise its client added itself."])
    rows = [[who, m["who_learns_what"].get(key, "—")] for key, who in _COALITIONS]
    return Section("masks", title, [
        f"Pairwise masks modulo the plain modulus inside every model upload: {m['neighbours']} neighbours per "
        f"client ({m['graph']} graph), threshold t = {m['threshold']}, up to {m['max_dropped']} dropped clients "
        f"recovered per round; {m['rounds_unmasked']} round(s) unmasked, {len(m['rounds_abandoned'])} abandoned "
        f"(not decrypted), {m['refused_messages']} mask message(s) refused (ledger). {_other_streams(m)}",
        Table(["coalition", "what it learns"], rows, "masks-table")])


def privacy_sections(f: dict) -> list[Section]:
    """Summary, unit, guarantee, accounting, mechanism, budget, covered, not covered (in this order);
    ``ddp+he`` adds the distributed-DP section after the guarantee, HE modes the masks section."""
    covered, not_cov = _coverage(f)
    ddp = [_distributed(f)] if f["cfg"].ddp else []
    masks = [_masks(f)] if f["cfg"].he else []
    return [_summary(f), _unit(f), _guarantee(f), *ddp, *masks, _accounting(f), _mechanism(f), _budget(f),
            covered, not_cov]
