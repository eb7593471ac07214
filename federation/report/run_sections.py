"""The system and results sections of the statement: trust model and encryption, randomness, what
reaches the server in plaintext, accuracy against the baseline, provenance.

Guarantees
----------
* Every figure comes from the facts of :func:`carbonfed.federation.report.facts.collect_facts`
  (ledger, server.json, report.json, the baseline's report.json, the report builder's environment,
  labelled as such).
* The plaintext section lists every field the ledger holds, including fields :data:`_FIELD_TEXT`
  does not describe.
* :func:`run_sections` returns the sections in the statement's order; each section is a pure
  function of the facts.
"""

from __future__ import annotations

import json

from carbonfed.federation.report.blocks import Section, Table, fmt_f4, fmt_g

# What each ledger field is, for the plaintext section (fields not listed here are still shown).
_FIELD_TEXT = {
    "node_id": "Flower node id of the client",
    "country": "the client's country name (its identity in the federation)",
    "kind": "request type (stats / train / evaluate): server bookkeeping",
    "round": "round number: server bookkeeping",
    "status": "accepted / rejected / refused / missing: what the server did with the reply",
    "reason": "free text: a refusal message (with the client's ε before and after), a rejection "
              "reason, or a client's error message",
    "bytes": "size of the client's upload in bytes",
    "epsilon": "the client's ε after this request (Opacus PRV)",
    "epsilon_before": "the client's ε before this round",
    "delta": "δ of the claims (server-side config)",
    "noise_multiplier": "the client's DP-SGD noise multiplier σ",
    "sample_rate": "the client's Poisson sampling rate q",
    "steps": "DP-SGD steps the client ran this round",
    "total_steps": "DP-SGD steps the client ran over the run (plus one step per statistics release)",
    "history": "the client's full accountant history: one [σ, q, steps] per mechanism",
    "clipped_params": "number of this client's model parameters the fixed-point codec clipped to "
                      "±param-clip: a plaintext statistic of its individual update",
    "signed": "the client's own statement of this line's facts, signed with its Ed25519 key and chained to its "
              "previous one (privacy/statements.py): the facts above, the SHA-256 of what it received and uploaded, "
              "revealing nothing more",
    "aggregates": "SHA-256 of each aggregate file a round wrote (round lines)",
}


def _trust(f: dict) -> Section:
    cfg, he, server = f["cfg"], f["report"].get("he"), f["server"]
    s = Section("trust", "Trust model, keys and encryption")
    s.blocks.append("**Signing keys**: each client holds its own Ed25519 key and signs every fact it reports "
                    "(`privacy/statements.py`); every client endorsed the run's charter (`charter.json`: mode, ε, δ, "
                    "rounds, min-train-clients, the clients' public keys) before round 1 and refuses requests that "
                    "break it. The public keys are in `clients.pub.json`; `carbonfed verify` needs nothing else.")
    if not cfg.he:
        s.blocks.append(f"No encryption in mode `{cfg.privacy}`: the server sees every update, the statistics and "
                        "the confusion matrices in the clear.")
        return s
    has_sk = he.get("server_has_secret_key") if he else None
    s.blocks.append([
        "**Clients** (training and held-out) all hold **one shared BFV secret key** (`secret.ctx` from "
        "`carbonfed keygen`). Any key holder can decrypt any ciphertext it obtains, not only aggregates.",
        f"**Server**: public context only; `server_has_secret_key` = **{str(has_sk).lower()}** (report.json). It adds "
        "ciphertexts and can also encrypt (forge terms).",
        "A server colluding with any one client reads every individual update: against that coalition only DP "
        "protects, which is why each client adds its own noise locally.",
        "The key fingerprint check catches honest misconfiguration only (it is self-reported).",
    ])
    heh = server.get("he") or {}
    rows = [["scheme", str(he.get("scheme"))], ["ring dimension N", str(he.get("poly_modulus_degree"))],
            ["coefficient modulus bits", str(he.get("coeff_mod_bit_sizes"))],
            ["plain modulus", str(he.get("plain_modulus"))], ["security", f"{he.get('security_bits')} bits"],
            ["server holds secret key", str(has_sk).lower()],
            ["key fingerprint (SHA-256 of public key)", f"`{heh.get('key_fingerprint', '—')}`"],
            ["packing", str(he.get("packing"))],
            ["fixed-point resolution", fmt_g(he.get("fixed_point_resolution"), 6)],
            ["upload per client per round", f"{he['upload_bytes_per_client_round'] / 1e3:.1f} kB"
             if he.get("upload_bytes_per_client_round") else "—"]]
    s.blocks.append(Table(["HE parameter", "value"], rows, "he-table"))
    return s


def _rng(f: dict) -> Section:
    cfg = f["cfg"]
    if not cfg.dp:
        return Section("rng", "Randomness", ["No DP noise is drawn in this mode."])
    keyed = ("keyed with **256 bits of OS entropy** (`secrets.randbits(256)`), a fresh key per client per round "
             "(and per statistics release)" if not cfg.reproducible_noise else
             f"keyed **deterministically from the public config seed** ({cfg.seed}), the country and the round "
             "(reproducible-noise = true): **anyone who knows the config can regenerate a client's noise, and "
             "against them the guarantee does not hold**")
    return Section("rng", "Randomness", [[
        f"DP-SGD noise, Poisson sampling and the statistics-release noise come from **ChaCha20** "
        f"(`randomgen.ChaCha`, 20 rounds), a cryptographically secure generator (CSPRNG), {keyed}.",
        "Each Gaussian value is the sum of four draws divided by two (float64), the hardening against "
        "floating-point precision attacks that Opacus's `secure_mode` applies (Holohan & Braghin 2021, §5.1).",
        f"Stochastic rounding in the fixed-point codec uses numpy PCG64 seeded from the public seed "
        f"({cfg.seed}); it acts on the already-noised update (post-processing).",
    ]])


def _plaintext(f: dict) -> Section:
    cfg = f["cfg"]
    s = Section("plaintext", "What reaches the server in plaintext")
    s.blocks.append("Every field below is in the ledger. All but the server's own bookkeeping (`kind`, `round`, "
                    "`status`, `delta`) were sent to the server in the clear by, or observed about, a client "
                    "(the example is each field's first non-null value in the ledger):")
    rows = []
    for k, val in sorted(f["fields_seen"].items()):
        ex = json.dumps(val, ensure_ascii=False)
        rows.append([f"`{k}`", _FIELD_TEXT.get(k, "(reported field)"), ex if len(ex) <= 60 else ex[:57] + "…"])
    s.blocks.append(Table(["field", "what", "example"], rows, "plaintext-table"))
    items = [
        "Node ids and **country names** of every client, and each client's **role** (train / held-out) from setup.",
        "The **key fingerprint** each client reports with every reply"
        + (f" (`{(f['server'].get('he') or {}).get('key_fingerprint', '—')[:16]}…`)" if cfg.he else "") + ".",
        "Each training client's **ε, δ, σ, q, steps, total steps and full accountant history** (reply metadata), "
        "and the per-update **clipped-parameter count**.",
        "**Reply sizes and timings**, refusals, errors and missing replies.",
        f"The **number of accepted contributions** (statistics: {f['stats_terms']}, model: {f['model_terms']}), "
        "which the server also sends to every client.",
    ]
    if cfg.he:
        items.append("Payloads (updates with their sample count, statistics, confusion matrices) are BFV "
                     "ciphertexts: not plaintext to the server.")
    else:
        items.append("**The payloads themselves**: every client's fixed-point model update with its sample count, "
                     "its statistics and every held-out client's confusion matrix (no encryption in this mode).")
    s.blocks.append(items)
    return s


def _accuracy(f: dict) -> Section:
    rep, base = f["report"], f["baseline"]
    m = rep.get("metrics") or {}
    s = Section("accuracy", "Accuracy and the non-private baseline")
    s.blocks.append(f"Held-out accuracy **{fmt_f4(m.get('accuracy'))}**, macro-F1 **{fmt_f4(m.get('macro_f1'))}** "
                    f"(last scored round; {rep['clients']['test']} held-out countries; exact, not DP).")
    averaged = (rep.get("model") or {}).get("averaged_rounds") or []
    if len(averaged) > 1:
        s.blocks.append(f"The model scored is the run's model: the mean of the global models of the last "
                        f"{f['cfg'].average_last} rounds (`average-last`; at the last round, rounds "
                        f"{averaged[0]}–{averaged[-1]}), in every row of the table below the mean as it stood after that round.")
    if base is None:
        s.blocks.append("**no baseline run given**: run the same config with `--privacy none` and pass it with "
                        "`--baseline DIR` to compare.")
        rows = [[str(h["round"]), fmt_f4(h.get("accuracy")), fmt_f4(h.get("macro_f1")), "—", "—"]
                for h in rep.get("history", [])]
    else:
        bm = base.get("metrics") or {}
        bcfg = (base.get("provenance") or {}).get("config") or {}
        ignore = {"privacy", "epsilon", "delta", "keys-dir", "out-dir", "data-dir", "stats-noise-multiplier",
                  "reproducible-noise"}
        diff = sorted(k for k in set(bcfg) | set(f["config"]) if k not in ignore and bcfg.get(k) != f["config"].get(k))
        da = (m.get("accuracy") - bm["accuracy"]) if m.get("accuracy") is not None and bm.get("accuracy") is not None else None
        df = (m.get("macro_f1") - bm["macro_f1"]) if m.get("macro_f1") is not None and bm.get("macro_f1") is not None else None
        s.blocks.append(f"Baseline (mode `{base.get('privacy_mode')}`): accuracy {fmt_f4(bm.get('accuracy'))}, macro-F1 "
                        f"{fmt_f4(bm.get('macro_f1'))}. Difference (this run − baseline): accuracy "
                        f"{'—' if da is None else f'{da:+.4f}'}, macro-F1 {'—' if df is None else f'{df:+.4f}'}.")
        if base.get("privacy_mode") not in ("none", "he"):
            s.blocks.append(f"**Caution:** the baseline runs mode `{base.get('privacy_mode')}`, which is not non-private.")
        s.blocks.append("The baseline's config matches this run's apart from the privacy settings." if not diff else
                        "**Caution:** the baseline's config also differs in " + ", ".join(f"`{k}`" for k in diff) + ".")
        bh = {h["round"]: h for h in base.get("history", [])}
        rows = [[str(h["round"]), fmt_f4(h.get("accuracy")), fmt_f4(h.get("macro_f1")),
                 fmt_f4(bh.get(h["round"], {}).get("accuracy")), fmt_f4(bh.get(h["round"], {}).get("macro_f1"))]
                for h in rep.get("history", [])]
    s.blocks.append(Table(["round", "accuracy", "macro-F1", "baseline accuracy", "baseline macro-F1"], rows,
                          "accuracy-table"))
    cm, classes = m.get("confusion_matrix"), m.get("classes")
    if cm is not None and classes:
        s.blocks.append("Confusion matrix of the last scored round, summed over the held-out countries (rows: true "
                        "class, columns: predicted), with each class's precision, recall and F1. Macro-F1 averages the "
                        "F1 of every class with a true or a predicted row, so a class the held-out countries do not "
                        "hold but the model predicts counts as F1 = 0.")
        s.blocks.append(Table(["true ↓ predicted →", *classes, "precision", "recall", "F1"],
                              [[c, *(str(v) for v in row), fmt_f4(pc["precision"]), fmt_f4(pc["recall"]), fmt_f4(pc["f1"])]
                               for c, row, pc in zip(classes, cm, m["per_class"])], "confusion-table"))
    return s


def _provenance(f: dict) -> Section:
    code, libs, rep, server = f["code"], f["libraries"], f["report"], f["server"]
    data = (rep.get("provenance") or {}).get("data") or {}
    commit = code["commit"] or "not available"
    dirty = {True: "**dirty**", False: "clean", None: "unknown"}[code["dirty"]]
    rows = [
        ["code version (git HEAD of the report builder's checkout)", f"`{commit}` ({dirty}: {code['detail']})"],
        ["config SHA-256 (server.json)", f"`{server.get('config_sha256')}` "
                                         f"({'recomputed: matches' if f['config_digest_ok'] else '**recomputed: DIFFERS**'})"],
        ["data SHA-256", f"`{data.get('sha256')}`"],
        ["data file", f"{data.get('path')} ({data.get('rows_used')} rows used)"],
        ["ledger", f"{f['ledger_lines']} lines, chain {'intact' if f['ledger_chain_ok'] else '**BROKEN**'}, "
                   f"last hash `{f['ledger_head']}`"],
        ["ledger.jsonl SHA-256", f"`{f['ledger_sha256']}`"],
        ["server.json SHA-256", f"`{f['server_sha256']}`"],
        ["run directory", f["run_dir"]],
    ]
    if server.get("resumed_from"):
        rows.append(["server restarts (resumed after round)", str(server["resumed_from"])])
    rows += [[f"{name} version (report builder's environment)", v] for name, v in libs.items()]
    return Section("provenance", "Provenance", [
        Table(["item", "value"], rows, "provenance-table"),
        "The run itself did not record its code commit or library versions: the versions above are those of the "
        "environment that generated this statement.",
    ])


def run_sections(f: dict) -> list[Section]:
    """Trust, randomness, plaintext, accuracy, provenance (in this order)."""
    return [_trust(f), _rng(f), _plaintext(f), _accuracy(f), _provenance(f)]
