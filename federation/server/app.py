"""The Flower ServerApp: loads the public context, runs :class:`EncryptedFedAvg` (recorded and
resumable: :class:`~carbonfed.federation.server.loop.ResumableRun`), writes the run.

It never loads a secret key: with HE on it loads ``keys-dir/public.ctx`` and refuses to start if
that file holds a secret key. It reads no data either: the vector lengths follow from the data
set's public schema (feature and class lists; a CSV run's config carries its own), so ``data-dir`` need not exist on the server. It writes, under ``out-dir``: ``ledger.jsonl``, the encrypted
aggregates (``aggregates/``), a checkpoint after every round (``checkpoint.json``,
``checkpoint/``) and ``server.json`` (config, HE parameters, timings). Decrypting the final
model and the metrics is the key holders' job (``carbonfed report``).

Started again on an out-dir that holds a checkpoint of the same config and key (a restarted
server: ``flwr run`` once more with the same run config), it resumes after the last complete
round; ``server.json`` then counts the time of every server that worked on the run and lists
the rounds it resumed after (``resumed_from``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from carbonfed.federation.config import RunConfig
from carbonfed.federation.client.participant import PLAIN_FINGERPRINT, Layouts, make_cipher
from carbonfed.federation.durable import atomic_write
from carbonfed.federation.enrolment import load_charter, publish_charter
from carbonfed.federation.run_data import data_schema, schema  # noqa: F401 (schema: re-exported, the bundled sets')
from carbonfed.federation.server.loop import ResumableRun
from carbonfed.federation.server.strategy import EncryptedFedAvg
from carbonfed.federation.wire import stage_key
from carbonfed.privacy.he import PUBLIC_CONTEXT_FILE, HEParams, key_fingerprint, load_public_context, params_of
from carbonfed.privacy.he_ring import check_ring

log = logging.getLogger("carbonfed")


def out_dir_for(cfg: RunConfig, run_id: int) -> Path:
    """The run's folder: run config ``out-dir``, or ``runs/flwr-<run id>`` under the working folder."""
    return Path(cfg.out_dir).resolve() if cfg.out_dir else Path.cwd() / "runs" / f"flwr-{run_id}"


def build_strategy(cfg: RunConfig, out: Path, on_round=None) -> tuple[ResumableRun, object]:
    """The server's run of ``cfg`` into ``out`` (:class:`ResumableRun` around
    :class:`EncryptedFedAvg`), and the public TenSEAL context (None with HE off)."""
    layouts = Layouts.for_run(cfg, *data_schema(cfg))
    ctx, fingerprint = None, PLAIN_FINGERPRINT
    if cfg.he:
        if not cfg.keys_dir:
            raise ValueError("HE is on: set run config keys-dir to the folder made by `carbonfed keygen`")
        ctx = load_public_context(Path(cfg.keys_dir) / PUBLIC_CONTEXT_FILE)
        check_ring(params_of(ctx), *layouts.he_requirement)   # keys that cannot sum this run exactly: refused
        fingerprint = key_fingerprint(ctx)
    lengths = {"update": layouts.update.length, "metrics": layouts.metrics.length,
               **{stage_key(k): lay.length for k, lay in enumerate(layouts.stages, 1)}}
    fedavg = EncryptedFedAvg(cfg, lambda kind: make_cipher(cfg, ctx, lengths[kind]), fingerprint, out)
    fedavg.charter = load_charter(cfg.charter) if cfg.charter else None   # every endorsement checked
    return ResumableRun(fedavg, on_round), ctx


def run_server(grid: Grid, context: Context, on_round=None) -> Path:
    """The ServerApp's body; ``on_round`` receives each round's summary (progress display)."""
    cfg = RunConfig.from_flower(dict(context.run_config))
    out = out_dir_for(cfg, grid.run.run_id)
    out.mkdir(parents=True, exist_ok=True)
    run, ctx = build_strategy(cfg, out, on_round)
    fedavg = run.fedavg
    if cfg.charter:
        publish_charter(cfg.charter, out)        # charter.json in the run folder, for its reviewers
    he = None
    if ctx is not None:
        he = {**params_of(ctx).describe(), "server_has_secret_key": ctx.has_secret_key(),
              "key_fingerprint": fedavg.fingerprint}
    run.start(grid)
    server = {"config": cfg.to_flower(), "config_sha256": cfg.digest(), "he": he,
              "plain_modulus": HEParams().plain_modulus, "total_s": run.elapsed(),
              # aggregates/model.bin: the run's model, the mean of the global models of model_rounds
              "model_terms": fedavg.output_model()[1], "model_rounds": fedavg.state.tail_rounds(),
              **fedavg.state.stage_terms(), "rounds_completed": fedavg.state.round, "resumed_from": run.resumed_from,
              "charter_sha256": run.charter_sha256() or None}
    atomic_write(out / "server.json", json.dumps(server, indent=2).encode())
    log.info("run written to %s", out)
    return out


def make_server_app(on_round=None) -> ServerApp:
    """A ServerApp whose main is :func:`run_server` (``on_round``: per-round progress callback)."""
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        """Run the server's part of the run (:func:`run_server`)."""
        run_server(grid, context, on_round)

    return server_app


app = make_server_app()
