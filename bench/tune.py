"""Hyper-parameter exploration without Flower: the same Participant code, summed in-process.

Not the product path (that is Flower, see federation/strategy.py); a quick way to compare
settings. Usage: python bench/tune.py '{"privacy": "none", "lr": 0.5}' '{"privacy": "dp", ...}'
Prints one JSON line per config: accuracy and macro-F1 on the held-out countries per round.
"""

import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np


def run(cfg_json: str) -> dict:
    import torch

    from data import load_dataset, split_countries
    from federation.config import RunConfig
    from federation.participant import Participant, make_cipher
    from federation.report import scores
    from privacy.secure_sum import SecureSum

    torch.set_num_threads(1)
    kw = json.loads(cfg_json)
    avg_last = kw.pop("avg_last", 1)
    cfg = RunConfig(**kw)
    kw["avg_last"] = avg_last
    ds = load_dataset(cfg.dataset)
    part = split_countries(ds.countries(), cfg.holdout_offset)
    ps = {c: Participant(cfg, ds, part, c) for c in ds.countries()}
    train = [p for p in ps.values() if p.role == "train"]
    test = [p for p in ps.values() if p.role == "test"]
    lay = train[0].layouts
    stats = SecureSum(make_cipher(cfg, None, lay.stats.length))
    for p in train:
        stats.add(p.setup()["stats"])
    sb, st = stats.serialize(), stats.terms
    model, mt = None, 0
    recent = []
    hist = []
    t0 = time.time()
    for rnd in range(1, cfg.rounds + 1):
        agg = SecureSum(make_cipher(cfg, None, lay.update.length))
        eps = 0
        for p in train:
            out = p.train(rnd, model, mt, sb, st)
            agg.add(out["update"])
            eps = max(eps, out["facts"].get("epsilon") or 0)
        model, mt = agg.serialize(), agg.terms
        recent = (recent + [model])[-avg_last:] if rnd > 1 else [model]
        if rnd % 5 == 0 or rnd == cfg.rounds:
            avg = SecureSum(make_cipher(cfg, None, lay.update.length))
            for m in recent:
                avg.add(m)
            msum = SecureSum(make_cipher(cfg, None, lay.metrics.length))
            for p in test:
                msum.add(p.evaluate(avg.serialize(), avg.terms * mt, sb, st))
            cm = lay.metrics.unpack_sum(np.frombuffer(msum.serialize(), dtype=np.int64), msum.terms)
            hist.append((rnd, *[round(v, 4) for v in scores(cm.reshape(5, 5)).values()], round(eps, 3)))
    return {"cfg": kw, "final": hist[-1], "hist": hist, "s": round(time.time() - t0, 1)}


if __name__ == "__main__":
    with ProcessPoolExecutor(2) as ex:
        for res in ex.map(run, sys.argv[1:]):
            print(json.dumps(res), flush=True)
