"""The DP Deployments Registry entry (federation/report/registry.py): the encoded schema accepts a
complete tier-3 entry and rejects what the registry's schema rejects; a run without DP is refused."""

import copy

import jsonschema
import pytest

from carbonfed.federation.report.registry import SCHEMA, registry_entry, validate

REPORT = {   # the fields of report.json the entry reads, with the values of a real 2-round `dp` run
    "dataset": "seed", "privacy_mode": "dp", "rounds": 2,
    "clients": {"train": 131, "test": 33},
    "metrics": {"accuracy": 0.7667, "macro_f1": 0.2893},
    "privacy": {"delta": 1e-05, "epsilon_target": 3.0, "epsilon_max": 2.9946, "accountant": "opacus.prv",
                "noise_multiplier": 1.7875, "max_grad_norm": 1.0, "sample_rate": 0.2},
    "preprocessing": {"statement": "charged to every training client's accountant as 3 Gaussian release(s)"},
    "he": None, "model": {"architecture": "linear 21→5"},
}


def test_entry_is_tier_3_and_valid():
    entry = registry_entry(REPORT)
    validate(entry)
    d = entry["deployment"]
    assert entry["tier"] == 3 and d["data_product_type"] == "Machine learning model"
    assert d["model"]["model_name"] == "Federated"
    assert d["privacy_loss"]["privacy_parameters"] == {"epsilon": 2.9946, "delta": 1e-05}
    for section in ("dp_flavor", "privacy_loss", "model", "accounting", "implementation"):
        assert section in d


@pytest.mark.parametrize("mutate", [
    lambda e: e["deployment"].pop("data_curator"),                     # a required tier-1 field
    lambda e: e["deployment"]["model"].update(model_name="Decentral"),  # not in the enumeration
    lambda e: e["deployment"]["dp_flavor"].update(colour="blue"),       # additionalProperties: False
    lambda e: e.update(tier=4),
    lambda e: e["deployment"].update(publication_date="5 December"),    # format: date
    lambda e: e["deployment"]["accounting"].pop("composition"),
])
def test_schema_rejects_what_the_registry_rejects(mutate):
    entry = copy.deepcopy(registry_entry(REPORT))
    mutate(entry)
    with pytest.raises(jsonschema.ValidationError):
        validate(entry)


def test_schema_requires_the_registry_top_level_fields():
    assert SCHEMA["required"] == ["status", "registry_authors", "tier", "deployment"]


def test_run_without_dp_is_refused():
    with pytest.raises(ValueError, match="privacy=he"):
        registry_entry({**REPORT, "privacy_mode": "he", "privacy": None})


def test_report_registry_on_a_run_without_dp_writes_nothing(tmp_path, capsys):
    """`carbonfed report DIR --registry` refuses a run without DP before it rebuilds anything."""
    import json

    from carbonfed.federation.config import RunConfig
    from carbonfed.federation.report_command import main as report_main

    (tmp_path / "server.json").write_text(json.dumps({"config": RunConfig(privacy="he").to_flower()}))
    assert report_main([str(tmp_path), "--registry"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "describes a DP deployment; this run has privacy=he" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["server.json"]


@pytest.mark.slow
def test_a_real_dp_runs_registry_entry_passes_the_schema(dphe_run, keys_dir, tmp_path):
    """The session's 2-round `dp+he` run (tests/federation/conftest.py), copied, then
    `carbonfed report DIR --keys KEYS --registry`: registry.yaml validates, and its ε, δ, curator and
    region are the run's and the options'."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    binary, out = Path(sys.executable).parent / "carbonfed", tmp_path / "run"
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_TELEMETRY_ENABLED": "0"}
    shutil.copytree(dphe_run[1], out)
    assert not (out / "registry.yaml").exists()                   # only on request
    rep = subprocess.run([str(binary), "report", str(out), "--keys", str(keys_dir), "--registry", "--curator", "Example Statistics Office",
                          "--region", "European Union"], capture_output=True, text=True, timeout=300, env=env)
    assert rep.returncode == 0, rep.stderr[-2000:]
    assert f"registry entry:       {out / 'registry.yaml'}" in rep.stdout
    entry = yaml.safe_load((out / "registry.yaml").read_text())
    validate(entry)
    report = json.loads((out / "report.json").read_text())
    d = entry["deployment"]
    assert d["privacy_loss"]["privacy_parameters"] == {"epsilon": report["privacy"]["epsilon_max"], "delta": 1e-05}
    assert 0 < report["privacy"]["epsilon_max"] <= 3.0
    assert (d["data_curator"], d["data_product_region"]) == ("Example Statistics Office", "European Union")
    assert d["model"]["model_name"] == "Federated" and entry["tier"] == 3
