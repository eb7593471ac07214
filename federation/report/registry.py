"""A tier-3 entry of the DP Deployments Registry (OpenDP) for a run: ``registry.yaml``.

The registry's schema is ``schemas/deployments-schema.yaml`` of ``opendp/deployments-registry-data``
(checked against commit ``617ad178``). Its repository states no licence, so the schema is not
vendored: :data:`SCHEMA` encodes its structure (required fields, enumerations, which objects
allow no other keys) and :func:`validate` checks an entry against it with ``jsonschema``.

Guarantees
----------
* Every number in the entry comes from ``report.json``, which comes from the ledger and the run's
  config: ε is the largest ε any client's ledger states (``privacy.epsilon_max``), δ the run's δ.
* The entry is written only for runs with DP (``dp``, ``dp+he``): a run without DP is not a DP
  deployment, and :func:`registry_entry` refuses it with a one-line error.
* ``status`` is ``Draft``: a generated entry is a proposal that the curator completes (the data
  curator and region default to what the run knows) and submits.
"""

from __future__ import annotations

import datetime as _dt
from importlib.metadata import version
from pathlib import Path

import jsonschema
import yaml

_STR = {"type": "string"}
_BOOL = {"type": "boolean"}


def _obj(required: list[str], props: dict) -> dict:
    return {"type": "object", "additionalProperties": False, "required": required, "properties": props}


SCHEMA = _obj(["status", "registry_authors", "tier", "deployment"], {
    "status": {"type": "string", "enum": ["Converted", "Draft", "Pending", "Changes Required", "Approved",
                                          "Approved (Update Requested)", "Approved (Pending)"]},
    "registry_authors": {"type": "array", "items": _STR, "minItems": 1},
    "tier": {"type": "integer", "enum": [1, 2, 3]},
    "deployment": _obj(
        ["name", "data_curator", "description", "intended_use", "data_product_type", "data_product_region",
         "publication_date"],
        {"name": _STR, "data_curator": _STR, "description": _STR, "intended_use": _STR,
         "data_product_type": {"type": "string", "enum": ["Summary statistics", "Machine learning model", "Dataset"]},
         "publication_date": {"type": "string", "format": "date"}, "data_product_region": _STR,
         "data_product_sector": {"type": "string", "enum": ["Technology", "Healthcare", "Education", "Government"]},
         "dp_flavor": _obj(["name", "data_domain", "unprotected_quantities"], {
             "name": {"type": "string", "enum": ["Pure DP", "Approximate DP", "Zero-concentrated DP", "Renyi DP",
                                                 "Custom"]},
             "input_metric": _STR, "bound_on_input_distance": _STR, "output_measure": _STR,
             "bound_on_output_distance": _STR, "data_domain": _STR, "unprotected_quantities": _STR}),
         "privacy_loss": _obj(["privacy_unit", "privacy_parameters"], {
             "privacy_unit": _STR, "privacy_unit_description": _STR,
             "privacy_parameters": {"type": "object", "additionalProperties": False,
                                    "properties": {"epsilon": {"type": "number"}, "rho": {"type": "number"},
                                                   "delta": {"type": "number"}}},
             "privacy_parameters_description": {}}),
         "model": _obj(["model_name"], {
             "model_name": {"type": "string", "enum": ["Local", "Central", "Shuffle", "Federated", "Varies"]},
             "model_name_description": _STR, "actors": _STR, "is_many_release": _BOOL,
             "is_many_release_description": _STR, "is_dynamic": _BOOL, "is_dynamic_description": {},
             "is_interactive": _BOOL, "is_interactive_description": _STR}),
         "accounting": _obj(["post_processing", "composition"], {"post_processing": _STR, "composition": _STR}),
         "implementation": _obj(["pre_processing_eda_hyperparameter_tuning", "mechanisms", "justification"], {
             "pre_processing_eda_hyperparameter_tuning": _STR, "mechanisms": _STR, "justification": _STR}),
         "additional_information": _STR}),
})


def validate(entry: dict) -> None:
    """Raise ``jsonschema.ValidationError`` if ``entry`` does not satisfy :data:`SCHEMA`."""
    jsonschema.validate(entry, SCHEMA, format_checker=jsonschema.FormatChecker())


def _privacy_text(report: dict) -> dict:
    p, pre = report["privacy"], report.get("preprocessing") or {}
    rounds, clients = report["rounds"], report["clients"]
    he = report.get("he")
    return {
        "mechanisms": (
            f"DP-SGD (Opacus {version('opacus')}): Poisson sampling at rate {p['sample_rate']}, per-example "
            f"clipping to L2 norm {p['max_grad_norm']}, Gaussian noise with multiplier {p['noise_multiplier']}, "
            f"run by every training party on its own rows, {rounds} rounds; "
            f"federated feature statistics: {pre.get('statement', 'none')}. Noise from ChaCha20 keyed with OS "
            "entropy, with Opacus secure_mode's floating-point hardening. "
            + (f"Uploads encrypted with BFV ({he['scheme']}, N = {he['poly_modulus_degree']}, "
               f"{he['security_bits']}-bit security, TenSEAL {version('tenseal')}); the server sums ciphertexts "
               "without the key. " if he else "Uploads are sent in the clear to the server. ")
            + f"Code: carbonfed {version('carbonfed')} (report.json provenance)."),
        "composition": (f"Each party's accountant ({p['accountant']}) composes its own releases over the whole run "
                        "(statistics releases and every DP-SGD step), recorded per round in a hash-chained ledger; "
                        "`carbonfed verify` recomputes every ε with dp-accounting's PLD accountant. Parties hold "
                        "disjoint rows, so the guarantee per row is the largest ε of any party (parallel composition)."),
        "unit": f"one row (one record of one party) of the {clients['train']} training parties",
    }


def registry_entry(report: dict, curator: str = "", region: str = "") -> dict:
    """The registry entry (module docstring) for a run's ``report.json`` content."""
    p = report.get("privacy")
    if not p or p.get("epsilon_max") is None:
        raise ValueError(f"a registry entry describes a DP deployment; this run has privacy={report['privacy_mode']}")
    text, model = _privacy_text(report), report.get("model") or {}
    m = report["metrics"]
    return {
        "status": "Draft", "registry_authors": [f"carbonfed {version('carbonfed')} (generated from the run ledger)"],
        "tier": 3,
        "deployment": {
            "name": f"carbonfed federated classifier ({report['dataset']} data, privacy mode {report['privacy_mode']})",
            "data_curator": curator or "the federation's parties (carbonfed key holders)",
            "description": (f"{model.get('architecture', 'a classifier')} trained by {report['clients']['train']} "
                            f"parties with federated learning; held-out accuracy {m['accuracy']:.4f}, macro-F1 "
                            f"{m['macro_f1']:.4f} on {report['clients']['test']} held-out parties."),
            "intended_use": "Classify records (emission categories) without any party sharing its rows.",
            "data_product_type": "Machine learning model",
            "publication_date": _dt.date.today().isoformat(),
            "data_product_region": region or "the jurisdictions of the participating parties",
            "dp_flavor": {
                "name": "Approximate DP", "input_metric": "symmetric distance in rows of one party's table",
                "bound_on_input_distance": "1 (one row added or removed)",
                "output_measure": "(ε, δ)-indistinguishability",
                "bound_on_output_distance": f"ε = {p['epsilon_max']:.4f}, δ = {p['delta']:g}",
                "data_domain": "each party's table of records (features and label), at most max-client-samples rows",
                "unprotected_quantities": (
                    "The held-out parties' evaluation metrics (exact confusion matrices, summed); each party's row "
                    "count (the weight of its update) and the total; which parties took part, their roles and "
                    "their number; reply sizes, timings and refusals; the public schema (feature and class "
                    "names). Tuning choices made on public data are not accounted.")},
            "privacy_loss": {"privacy_unit": text["unit"],
                             "privacy_unit_description": "datasets that differ in one row of one party",
                             "privacy_parameters": {"epsilon": float(p["epsilon_max"]), "delta": float(p["delta"])},
                             "privacy_parameters_description": (f"target ε = {p['epsilon_target']}; ε is the largest "
                                                                "of the parties' ledger-stated ε")},
            "model": {"model_name": "Federated", "actors": (
                          "Parties (hold their rows and the secret key; honest-but-curious), the aggregation server "
                          "(public key only: sees ciphertexts, not updates), readers of the model (see the DP "
                          "output). A server colluding with any key holder sees single DP updates."),
                      "is_many_release": False, "is_dynamic": False, "is_interactive": False},
            "accounting": {"post_processing": ("FedAvg of the DP updates, the mean of the last rounds' global models, "
                                               "and the scaler derived from the released statistics"),
                           "composition": text["composition"]},
            "implementation": {
                "pre_processing_eda_hyperparameter_tuning": (
                    "Feature scaling from federated DP statistics releases (inside ε). Hyperparameters were chosen "
                    "on validation folds of the training parties of public data, not on the parties' private data."),
                "mechanisms": text["mechanisms"],
                "justification": "bench/RESULTS.md records the experiments behind every setting."},
            "additional_information": "Generated by `carbonfed report --registry` from report.json and ledger.jsonl.",
        },
    }


def write_registry(run_dir: str | Path, report: dict, curator: str = "", region: str = "") -> Path:
    """Write ``registry.yaml`` beside ``report.json`` after checking it against :data:`SCHEMA`."""
    entry = registry_entry(report, curator, region)
    validate(entry)
    path = Path(run_dir) / "registry.yaml"
    path.write_text(yaml.safe_dump(entry, sort_keys=False, allow_unicode=True, width=100))
    return path
