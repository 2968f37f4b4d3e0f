"""Cache read efficiency: adapter training throughput streaming the cache from disk, as `cachefeat train
--in-memory no` does it (reader processes reading buffers of shards straight from the shard files, with
prefetch, going on into the next epoch's plan as soon as this one's is read), divided by the same training
with the selection already loaded into RAM.

    efficiency = clips/s streamed  /  clips/s in RAM        (goal >= 0.90)

Both are `cachefeat.train.train` runs of 8 epochs (the recipes train 30-60) on the same cache, adapter, seed, clips and
batch size (RAM shuffles over the whole cache, streaming within buffers of shards), alternated (RAM, streamed,
RAM, streamed, ...) and compared by the medians of their clips/s over whole runs. A run's time includes
starting the reader processes at its first epoch; later epochs start on batches already read. Reported
apart: the first and the later epochs, and one process's reading rate from the shard files and through
zarr. The adapter is EVL with temporal cross-attention, which reads the patch tokens of 5 blocks (4 on the
tiny quick-mode model): the heaviest reader of the product's adapters. The cache's files are in the page
cache after the first run (it is far smaller than RAM), so this measures decompression, assembly and
transport, not the disk. To make epochs long enough to matter without decoding more videos, the training
cache holds several temporal views per video and an epoch here trains on all of them (`--train-views all`).
"""
from __future__ import annotations

import dataclasses
import shutil
import statistics
import time

from cachefeat.extract import ExtractSettings, extract
from cachefeat.extract.manifest import load_manifest
from cachefeat.store import open_cache
from cachefeat.train import TrainConfig, cpu_threads, open_run, train
from cachefeat.train.reader import CacheDataset

from common import WORK, synth_data

GOAL = 0.90


def settings(mode) -> dict:
    if mode.smoke:
        return {"model": "cachefeat-tiny-ViT", "layers": "all", "evl_layers": 1, "frames": 2, "batch": 4, "rounds": 1,
                "epochs": 2, "shard_size": 4, "videos_per_class": 3, "threads": 1, "videos": 12, "train_views": 1}
    if mode.full:
        return {"model": "ViT-B/16", "layers": "last:5", "evl_layers": 4, "frames": 8, "batch": 32, "rounds": 3,
                "epochs": 8, "shard_size": None, "videos_per_class": 100, "threads": 0, "videos": None,
                "train_views": 2}
    # the tiny registered ViT (4 blocks, width 64): extraction is cheap, and per byte read the adapter does
    # less work than on a real model, so this is the harder case for the reader
    # one torch thread: on a shared 2-core machine two threads ran the adapter 8x slower (the CLI tests
    # and `--threads 1` do the same)
    return {"model": "cachefeat-tiny-ViT", "layers": "all", "evl_layers": 3, "frames": 8, "batch": 32, "rounds": 3,
            "epochs": 8, "shard_size": 32, "videos_per_class": 100, "threads": 1, "videos": 192,
            "train_views": 4}


def stage2_data(mode):
    """The synthetic data set the stage-two sections share (6 classes, 75% train / 25% val)."""
    return synth_data("stage2-data", classes=6, videos_per_class=settings(mode)["videos_per_class"], frames=16,
                      size=32 if mode.smoke else 64, seed=3)


def stage2_decode_workers(mode) -> int:
    """Decode processes for the stage-two sections' extractions and online runs: with the tiny quick-mode
    model the backbone costs next to nothing, so decoding gets every core."""
    import os
    return mode.decode_workers if mode.full else max(1, os.cpu_count() or 1)


def make_cache(mode, name: str, split: str, model: str, layers: str, tokens: str, frames: int, dtype="float16",
               shard_size=None, fresh=False, views=None, videos: int | None = None) -> tuple:
    """Extract `split` of the shared data set (or `videos` of it, drawn at random with a fixed seed, so all
    classes stay) into benchmarks/work/<name>.zarr (reused when complete unless `fresh`). Returns (path,
    seconds of the extract call or None when reused)."""
    import numpy as np

    from cachefeat.specs import ViewSpec
    data = stage2_data(mode)
    out = WORK / f"{name}.zarr"
    if not fresh and (out / "zarr.json").exists():
        try:
            if open_cache(out).complete:
                return out, None
        # B110: a damaged or older cache from an earlier run is rebuilt below
        except Exception:  # nosec B110
            pass
    shutil.rmtree(out, ignore_errors=True)
    manifest = load_manifest(data / f"{split}.txt", classes=str(data / "classes.txt"))
    if videos is not None and videos < len(manifest.videos):
        keep = np.sort(np.random.default_rng(0).permutation(len(manifest.videos))[:videos])
        manifest.videos = [manifest.videos[i] for i in keep]
    s = ExtractSettings(model=model, pretrained="none", layers=layers, tokens=tokens, frames=frames,
                        device=mode.device, dtype=dtype, shard_size=shard_size, text=False,
                        views=views or ViewSpec())
    t0 = time.perf_counter()
    extract(manifest, out, s, batch_size=mode.batch_size, decode_workers=stage2_decode_workers(mode), progress=False,
            log=lambda *a: None)
    return out, time.perf_counter() - t0


def stage2_cache(mode, dtype: str, split: str) -> tuple:
    """The all-token cache of the shared data set that the reading and int8 sections both use."""
    from cachefeat.specs import ViewSpec
    st = settings(mode)
    views = ViewSpec(st["train_views"], 1) if split == "train" else ViewSpec()
    name = f"stage2-{st['model'].replace('/', '-')}-{st['layers'].replace(':', '')}-{dtype}-{split}-v{views.count}"
    return make_cache(mode, name, split, st["model"], st["layers"], "all", st["frames"], dtype=dtype,
                      shard_size=st["shard_size"], videos=st["videos"] if split == "train" else None, views=views)


# what the section's docs table (run.py's report) needs; `run.py --smoke` checks every one is returned
KEYS = (
    'goal',
    'adapter',
    'adapter_opts',
    'model',
    'reads',
    'mib_per_clip',
    'clips',
    'batch_size',
    'shards',
    'workers',
    'rounds',
    'epochs',
    'device',
    'ram_clips_per_s',
    'streamed_clips_per_s',
    'efficiency',
    'verdict',
    'first_epoch_efficiency',
    'later_epochs_efficiency',
    'streamed_first_batch_s',
    'streamed_later_first_batch_s',
    'single_process_read_clips_per_s',
    'single_process_read_zarr_clips_per_s',
)


def run(mode, log=print) -> dict:
    st = settings(mode)
    cache, _ = stage2_cache(mode, "float16", "train")
    c = open_cache(cache)
    runs = {}
    for how in ("yes", "no"):
        cfg = TrainConfig(adapter="evl", adapter_opts={"layers": st["evl_layers"]}, epochs=st["epochs"],
                          batch_size=st["batch"], device=mode.device, in_memory=how, seed=0, threads=st["threads"],
                          train_views="all")
        runs[how] = open_run(cfg, str(cache))
        _time_batches(runs[how].train_source)
    r = runs["yes"]
    sel = r.train_source.selection
    mib_per_clip = sel.bytes_per_clip(c.meta) / 2 ** 20
    clips = len(r.train_source.rows(0, train=True))
    log(f"[reading] {st['model']}: evl layers={st['evl_layers']} reads {r.needs.describe()}; {clips} clips of "
        f"{mib_per_clip:.2f} MiB per epoch ({clips * mib_per_clip:.0f} MiB), batch {st['batch']}, "
        f"{c.layout.num_shards} shards, {st['epochs']} epochs per run, streamed by {runs['no'].cfg.read_workers} "
        f"workers")
    # the reader's own cost: one process loading the whole selection (what each worker does, per buffer),
    # straight from the shard files (the default) and through zarr, interleaved
    read_rate = {"direct": [], "zarr": []}
    for _ in range(2):
        for how in read_rate:
            reader = open_cache(cache)
            reader.direct_reads = how == "direct"
            t0 = time.perf_counter()
            CacheDataset(reader, sel, in_memory="yes")
            read_rate[how].append(clips / (time.perf_counter() - t0))
    read_rate = {k: max(v) for k, v in read_rate.items()}
    rates = {"yes": [], "no": []}            # clips/s of whole training runs
    epoch_rates = {"yes": ([], []), "no": ([], [])}    # clips/s of (first epochs, later epochs)
    first = {"yes": ([], []), "no": ([], [])}          # seconds to the first batch of (first, later) epochs
    with cpu_threads(st["threads"]):
        for i in range(st["rounds"] + 1):          # round 0, of one epoch, warms up (page cache, allocator)
            for how, run_ in runs.items():
                src = run_.train_source
                src.first_batches = []
                cfg = run_.cfg
                run_.cfg = dataclasses.replace(cfg, epochs=cfg.epochs if i else 1)
                hist = train(run_, None, log=lambda *a: None).history
                run_.cfg = cfg
                if i:
                    rates[how].append(len(hist) * clips / sum(h["seconds"] for h in hist))
                    epoch_rates[how][0].append(hist[0]["clips_per_s"])
                    epoch_rates[how][1].extend(h["clips_per_s"] for h in hist[1:])
                    first[how][0].append(src.first_batches[0])
                    first[how][1].extend(src.first_batches[1:])
    med = statistics.median
    mem, stream = med(rates["yes"]), med(rates["no"])
    eff = stream / mem
    eff_first = med(epoch_rates["no"][0]) / med(epoch_rates["yes"][0])
    eff_later = med(epoch_rates["no"][1]) / med(epoch_rates["yes"][1])
    verdict = "met" if eff >= GOAL else f"missed by {GOAL - eff:.2f}"
    log(f"  in RAM {mem:.1f} clips/s, streamed {stream:.1f} clips/s: efficiency {eff:.2f} ({verdict}); first epoch "
        f"{eff_first:.2f} (first batch after {med(first['no'][0]):.2f} s: reader start-up), later epochs "
        f"{eff_later:.2f} (first batch after {med(first['no'][1]):.3f} s: read ahead); one process reads "
        f"{read_rate['direct']:.0f} clips/s from the shard files, {read_rate['zarr']:.0f} through zarr")
    return {"model": st["model"], "adapter": "evl", "adapter_opts": {"layers": st["evl_layers"]},
            "reads": r.needs.describe(), "clips": clips, "mib_per_clip": mib_per_clip, "batch_size": st["batch"],
            "shards": c.layout.num_shards, "workers": runs["no"].cfg.read_workers, "device": mode.device,
            "rounds": st["rounds"], "epochs": st["epochs"], "ram_clips_per_s": mem, "streamed_clips_per_s": stream,
            "ram_samples": rates["yes"], "streamed_samples": rates["no"], "efficiency": eff, "goal": GOAL,
            "verdict": verdict, "threads": st["threads"], "first_epoch_efficiency": eff_first,
            "later_epochs_efficiency": eff_later, "streamed_first_batch_s": med(first["no"][0]),
            "streamed_later_first_batch_s": med(first["no"][1]), "ram_first_batch_s": med(first["yes"][0]),
            "single_process_read_clips_per_s": read_rate["direct"],
            "single_process_read_zarr_clips_per_s": read_rate["zarr"]}


def _time_batches(src) -> None:
    """Append to `src.first_batches`, every epoch, the seconds until its first batch arrives."""
    inner = src.batches

    def batches(epoch, train):
        t0 = time.perf_counter()
        for i, b in enumerate(inner(epoch, train)):
            if i == 0:
                src.first_batches.append(time.perf_counter() - t0)
            yield b
    src.batches = batches
