"""`carbonfed report` on a real 2-round dp+he run (with four faulty clients): privacy_statement.md states what the ledger
says, and report.html renders in headless Chromium with its table and embedded plots.

Chromium is required (CI installs it with `apt-get install -y chromium`); without it the
rendering test fails, it does not skip.
"""

from __future__ import annotations

import base64
import io
import json
import math
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from carbonfed.federation.report_command import main as report_main
from carbonfed.privacy.ledger import read_ledger
from carbonfed.privacy.statements import line_history

pytestmark = pytest.mark.slow   # builds whole federations

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("chromium is not installed (no `chromium` or `chromium-browser` on PATH): this test renders "
                "report.html in headless Chromium. Install it with `apt-get install -y chromium` "
                "(Debian/Ubuntu); CI installs it.", pytrace=False)


def _run_chromium(tmp_path, *args) -> subprocess.CompletedProcess:
    profile = tmp_path / f"chromium-profile-{len(list(tmp_path.glob('chromium-profile-*')))}"
    proc = subprocess.run([_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, f"chromium exited {proc.returncode}: {proc.stderr[-2000:]}"
    return proc


@pytest.fixture(scope="module")
def run(dphe_run):
    """The session's 2-round dp+he run with its four faulty clients (tests/federation/conftest.py),
    reported by `carbonfed report DIR --keys KEYS`: (cfg, folder, exit code)."""
    return dphe_run


def _ledger_figures(out):
    ledger = read_ledger(out / "ledger.jsonl")
    last = {}
    for line in ledger:
        if line["kind"] in ("stats", "train") and line.get("epsilon") is not None:
            last[line["country"]] = line
    sigmas = {l["noise_multiplier"] for l in ledger if l["kind"] == "train" and l.get("noise_multiplier") is not None}
    return last, sigmas


def test_report_command_writes_all_files_and_passes(run):
    _, out, rc = run
    assert rc == 0
    for name in ("report.json", "report.html", "privacy_statement.md"):
        assert (out / name).is_file(), name
    # the audit ran with no key: the banner says what it rests on and what it could not check, and
    # each document carries the claims that verify checked against the signed record
    from carbonfed.privacy.audit.claims import read_claims_block
    page = (out / "report.html").read_text()
    assert "Audit passed: every client fact signed by its client" in page and "Not checked:" in page
    eps = json.loads((out / "report.json").read_text())["privacy"]["epsilon_per_client"]
    for name in ("report.html", "privacy_statement.md"):
        claims = read_claims_block((out / name).read_text())
        assert claims["privacy_mode"] == "dp+he" and claims["epsilon_per_client"] == eps, name


def test_privacy_statement_states_the_ledger(run):
    cfg, out, _ = run
    md = (out / "privacy_statement.md").read_text()
    last, sigmas = _ledger_figures(out)
    eps_max = max(l["epsilon"] for l in last.values())
    assert f"ε_max = {eps_max:.4f}" in md and repr(eps_max) in md
    assert f"δ = {cfg.delta:g}" in md
    assert "PRV" in md and "dp_accounting.pld" in md
    assert len(sigmas) == 1
    sigma = sigmas.pop()
    assert f"{sigma:.12g}" in md
    # every training client's ε appears in its table row
    for country, line in last.items():
        assert f"| {country} | {line['epsilon']:.4f} |" in md
    # μ-GDP by the CLT formula, recomputed here from the ledger's mechanism
    # (the largest over the clients: with the fault drills, not every client has the same history)
    mu2 = max(sum(st / s ** 2 if q == 1.0 else q * q * st * math.expm1(1 / s ** 2) for s, q, st in line_history(line))
              for line in last.values())
    assert f"μ_max ≈ {math.sqrt(mu2):.4f}" in md and "not a bound" in md
    # the plaintext section names what the server sees in the clear
    section = md.split("## What reaches the server in plaintext", 1)[1].split("\n## ", 1)[0]
    for word in ("node_id", "country", "fingerprint", "history", "clipped_params", "accepted contributions"):
        assert word in section, word
    assert "no baseline run given" in md
    assert "the uploads are not masked (`--masks` is off)" in md             # masks are opt-in: said so
    # the confusion matrix of report.json, one row per true class
    m = json.loads((out / "report.json").read_text())["metrics"]
    for c, row in zip(m["classes"], m["confusion_matrix"]):
        assert f"| {c} | " + " | ".join(str(v) for v in row) + " |" in md
    assert "ChaCha20" in md and "CSPRNG" in md and "256 bits of OS entropy" in md and "Mersenne" not in md
    assert json.loads((out / "server.json").read_text())["config_sha256"] in md


class _Dom(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()
        self.imgs: dict[str, str] = {}
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "img":
            self.imgs[a.get("id", "")] = a.get("src", "")
        for key in ("src", "href"):
            if a.get(key) and not a[key].startswith(("data:", "#")):
                self.external.append(f"<{tag} {key}={a[key][:80]}>")
        if tag in ("script", "link", "iframe"):
            self.external.append(f"<{tag}>")


def test_report_html_renders_in_headless_chromium(run, tmp_path):
    from PIL import Image

    _, out, _ = run
    page = (out / "report.html").resolve()
    url = page.as_uri()
    png = tmp_path / "report.png"
    _run_chromium(tmp_path, f"--screenshot={png}", "--window-size=1280,2400", url)
    assert png.is_file() and png.stat().st_size > 10_000
    img = Image.open(png).convert("RGB")
    assert img.size == (1280, 2400)
    colours = img.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 200, "screenshot looks blank"
    white = sum(n for n, c in colours if min(c) >= 250)
    assert white < 0.95 * img.size[0] * img.size[1], "screenshot is almost all white"

    dom = _Dom()
    dom.feed(_run_chromium(tmp_path, "--dump-dom", url).stdout)
    for needed in ("epsilon-table", "plot-epsilon", "plot-accuracy", "headline", "verify-status"):
        assert needed in dom.ids, needed
    for pid in ("plot-epsilon", "plot-accuracy"):
        src = dom.imgs[pid]
        assert src.startswith("data:image/png;base64,"), src[:60]
        raw = base64.b64decode(src.split(",", 1)[1])
        assert Image.open(io.BytesIO(raw)).size[0] > 300
    assert dom.external == [], f"report.html is not self-contained: {dom.external}"


def test_failed_audit_is_visible_and_fails_the_command(run, tmp_path, keys_dir):
    _, out, _ = run
    bad = tmp_path / "tampered"
    shutil.copytree(out, bad)
    lines = (bad / "ledger.jsonl").read_text().splitlines()
    i = next(k for k, l in enumerate(lines) if json.loads(l).get("kind") == "train")
    rec = json.loads(lines[i])
    rec["epsilon"] = rec["epsilon"] / 2          # an understated claim, hash not recomputed
    lines[i] = json.dumps(rec, sort_keys=True)
    (bad / "ledger.jsonl").write_text("\n".join(lines) + "\n")
    assert report_main([str(bad), "--keys", str(keys_dir)]) != 0
    html = (bad / "report.html").read_text()
    assert "Audit FAILED" in html and f"line {i + 1}" in html
    assert "**FAILED**" in (bad / "privacy_statement.md").read_text()
