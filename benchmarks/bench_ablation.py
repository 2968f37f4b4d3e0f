"""Ablation cost: K adapter configurations x E epochs each on the synthetic data set, total wall time

    cached  = one extraction (the whole `extract` call, model load included) + K runs reading the cache
    online  = K runs that decode the videos and run the frozen backbone every step (OnlineSource: the same
              plan and batches as the cache gives, see tests/test_train.py)

Measured: the smallest point (K=2 configs x E=3 epochs quick, 2 x 2 full), end to end, both ways. From those runs
come the per-unit costs (extraction X; per-config setup s_c, s_o; per-epoch c, o, each the median over the
measured epochs), and from them the totals of larger ablations, *derived, not measured*:

    cached(K, E) = X + K*s_c + K*E*c        online(K, E) = K*s_o + K*E*o

so online/cached grows with K*E towards o/c, and breaks even at K*E ~ X / (o - c).
"""
from __future__ import annotations

import statistics
import time

from cachefeat.store import open_cache
from cachefeat.train import TrainConfig, cpu_threads, open_run, train
from cachefeat.train.online import OnlineSource, backbone_from_meta

from bench_reading import make_cache, stage2_decode_workers

# K configurations of the temporal adapter, cycled (it reads the last block's CLS)
CONFIGS = [{"dim": 64, "depth": 1}, {"dim": 128, "depth": 2}, {"dim": 128, "depth": 1}, {"dim": 256, "depth": 2}]
POINTS = [(1, 1), (2, 3), (4, 10), (8, 30), (16, 50), (32, 100)]


def settings(mode) -> dict:
    if mode.smoke:
        return {"model": "cachefeat-tiny-ViT", "frames": 2, "batch": 4, "K": 2, "E": 2, "videos": 8, "threads": 1}
    if mode.full:
        return {"model": "ViT-B/16", "frames": 8, "batch": 32, "K": 2, "E": 2, "videos": None, "threads": 0}
    return {"model": "cachefeat-tiny-ViT", "frames": 8, "batch": 16, "K": 2, "E": 3, "videos": 48, "threads": 1}


# what the section's docs table (run.py's report) needs; `run.py --smoke` checks every one is returned
KEYS = (
    'model',
    'device',
    'videos',
    'frames',
    'extraction_s',
    'cached_epoch_s',
    'online_epoch_s',
    'epoch_ratio',
    'cached_setup_s',
    'online_setup_s',
    'measured.K',
    'measured.E',
    'measured.cached_s',
    'measured.online_s',
    'measured.ratio',
    'derived',
    'formula',
)


def run(mode, log=print) -> dict:
    st = settings(mode)
    K, E = st["K"], st["E"]
    t0 = time.perf_counter()
    cache, X = make_cache(mode, f"ablation-{st['model'].replace('/', '-')}", "train", st["model"], "last:1", "cls",
                          st["frames"], fresh=True, videos=st["videos"])
    X = time.perf_counter() - t0     # the whole call, as a user waits for it
    c = open_cache(cache)
    clips = len(c.clip_video())
    log(f"[ablation] {st['model']}: {clips} training videos x {st['frames']} frames; extraction {X:.1f} s; "
        f"{K} temporal-adapter configs x {E} epochs, batch {st['batch']}")
    backbone = None
    totals = {"cached": X, "online": 0.0}
    epochs = {"cached": [], "online": []}
    setup = {"cached": [], "online": []}
    for k in range(K):
        for how in ("cached", "online"):       # alternate, so drift hits both
            cfg = TrainConfig(adapter="temporal", adapter_opts=CONFIGS[k % len(CONFIGS)], epochs=E,
                              batch_size=st["batch"], device=mode.device, seed=k, threads=st["threads"])
            w0 = time.perf_counter()
            r = open_run(cfg, str(cache))
            if how == "online":
                if backbone is None:
                    backbone = backbone_from_meta(c.meta, mode.device)
                r.train_source = OnlineSource(r.train_cache, r.needs, cfg.batch_size, cfg.seed,
                                              backbone=backbone, decode_workers=stage2_decode_workers(mode))
            with cpu_threads(st["threads"]):
                res = train(r, None, log=lambda *a: None)
            wall = time.perf_counter() - w0
            ep = [h["seconds"] for h in res.history]
            totals[how] += wall
            epochs[how] += ep
            setup[how].append(wall - sum(ep))
            log(f"  config {k + 1} {how}: {wall:.1f} s ({', '.join(f'{s:.2f}' for s in ep)} s per epoch)")
    cpe, ope = statistics.median(epochs["cached"]), statistics.median(epochs["online"])
    sc, so = statistics.median(setup["cached"]), statistics.median(setup["online"])

    def cached_total(k, e):
        return X + k * sc + k * e * cpe

    def online_total(k, e):
        return k * so + k * e * ope

    measured = {"K": K, "E": E, "cached_s": totals["cached"], "online_s": totals["online"],
                "ratio": totals["online"] / totals["cached"]}
    log(f"  measured K={K}, E={E}: cached {totals['cached']:.1f} s (extraction included), online "
        f"{totals['online']:.1f} s: online/cached {measured['ratio']:.2f}")
    derived = [{"K": k, "E": e, "KxE": k * e, "cached_s": cached_total(k, e), "online_s": online_total(k, e),
                "ratio": online_total(k, e) / cached_total(k, e)} for k, e in POINTS]
    for d in derived:
        log(f"  derived K={d['K']}, E={d['E']}: cached {d['cached_s']:.0f} s, online {d['online_s']:.0f} s, "
            f"ratio {d['ratio']:.1f}")
    breakeven = X / (ope - cpe) if ope > cpe else None
    return {"model": st["model"], "device": mode.device, "videos": clips, "frames": st["frames"],
            "batch_size": st["batch"], "decode_workers": stage2_decode_workers(mode), "configs": CONFIGS[:K],
            "extraction_s": X, "cached_epoch_s": cpe, "online_epoch_s": ope, "cached_setup_s": sc,
            "online_setup_s": so, "epoch_ratio": ope / cpe, "breakeven_KxE": breakeven, "measured": measured,
            "derived": derived, "formula": "cached = X + K*s_c + K*E*c; online = K*s_o + K*E*o"}
