"""GPU acceptance in one command (`make gpu-check`): stage one and stage two measured on one GPU, offline.

    tests       tests/test_gpu.py under pytest (its tests skip themselves without CUDA)
    stage one   ViT-B/16 and ViT-L/14 (random weights), 8 frames, 224 px, (a) `--layers all --tokens cls`
                and (b) `--layers last:4 --tokens all`: the whole extract pipeline (pipeline.extract, what
                `cachefeat extract` runs in one process, timed by its own ExtractStats: the run loop, model
                creation left out, filling and draining counted) against its ceilings on the same run: the
                bare forward (Backbone.features on frames already on the device: same taps, batch and
                precision), the decoders alone (the decode pool, nothing else running) and the writer alone
                (store.write_shard of shards of this layout). efficiency = pipeline / the smallest ceiling
    tuning      the bare forward under SDPA on/off (the math kernel forced), fp16 / bf16 / fp32, torch.compile,
                CUDA graphs (compile mode reduce-overhead), batch sizes: each variant measured and reported
    nvdec       `--decoder nvdec`: reported as skipped (cachefeat extract has no GPU decoder yet)
    stage two   a B/16 8-frame cache: reading it into GPU memory as training does (evaluate.to_device from
                pageable arrays) and through page-locked buffers with copies on a side stream; step time of
                temporal, evl and dist; evl cached vs online (backbone and decoding in the loop); the share
                of time the GPU is busy while evl trains from the cache (profiler: kernel time / wall time)
    distributed the training step wrapped in DistributedDataParallel over a torch.distributed process group
                (nccl on a GPU, gloo on CPU; world size 1, tcp on localhost); Ray Train when Ray is present

Without CUDA every step runs at toy sizes on the CPU (the tiny registered ViT in both model slots), in
under 2 minutes, and says so: tests/test_gpu_check.py runs that mode so this script cannot rot between GPU
runs. Writes <out>/<card>-<date>-gpu.json and .log (card: torch.cuda.get_device_name, slugified; `cpu`).

Offline: installs nothing. The GPU image lacks some of cachefeat's dependencies (zarr, numcodecs, crc32c,
donfig, PyAV, open_clip); benchmarks/gpu_wheels.sh downloads their wheels into benchmarks/gpu-wheels/,
which this script unpacks into a private folder and puts on sys.path (after the packages already there).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WHEELS = HERE / "gpu-wheels"
CORE_MODULES = ("torch", "numpy", "zarr", "numcodecs", "crc32c", "google_crc32c", "donfig", "av", "open_clip",
                "timm", "click", "yaml", "psutil", "tqdm", "PIL", "h5py")


# ------------------------------------------------------------------------------------------- sys.path
def _wheel_modules(z: zipfile.ZipFile) -> set[str]:
    """The top-level importable names a wheel holds (its folders and modules, not its metadata or libs)."""
    tops = {n.split("/", 1)[0] for n in z.namelist()}
    return {t.split(".", 1)[0] for t in tops if "." not in t or t.endswith((".py", ".so"))}


def _vendored_site() -> Path | None:
    """Unpack the wheels of benchmarks/gpu-wheels/ that this Python lacks (any of its modules not
    importable) into a folder under the temp dir, once per such set, and return it; None when none is
    needed. Only what is missing goes there, so PYTHONPATH (which comes before site-packages in a
    subprocess) shadows nothing installed. A wheel is a zip of what goes into site-packages."""
    import importlib.util
    wheels = sorted(WHEELS.glob("*.whl")) if WHEELS.is_dir() else []
    needed = []
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            if any(importlib.util.find_spec(m) is None for m in _wheel_modules(z)):
                needed.append(w)
    if not needed:
        return None
    key = "-".join(f"{w.name}:{w.stat().st_size}" for w in needed)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]        # the same wheels: the same folder, unpacked once
    site = Path(tempfile.gettempdir()) / f"cachefeat-gpu-site-{digest}"
    mark = site / ".unpacked"
    if not mark.is_file() or mark.read_text() != key:
        shutil.rmtree(site, ignore_errors=True)
        site.mkdir(parents=True)
        for w in needed:
            with zipfile.ZipFile(w) as z:
                for name in z.namelist():          # our own downloads, still: nothing outside the folder
                    if name.startswith("/") or ".." in Path(name).parts:
                        raise SystemExit(f"gpu_check: {w.name} holds a path outside its folder ({name}); "
                                         f"run benchmarks/gpu_wheels.sh again")
                z.extractall(site)
        mark.write_text(key)
    return site


def setup_path() -> Path | None:
    """The repo root and benchmarks/ first (the project need not be pip-installed), the vendored wheels
    last (packages already installed win); exported through PYTHONPATH for subprocesses (decode workers
    are spawned, pytest runs in its own process)."""
    site = _vendored_site()
    front = [str(REPO), str(HERE)]
    for p in reversed(front):
        if p not in sys.path:
            sys.path.insert(0, p)
    if site is not None and str(site) not in sys.path:
        sys.path.append(str(site))
    parts = front + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p] + \
        ([str(site)] if site else [])
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    return site


def missing_modules(names=CORE_MODULES) -> list[str]:
    import importlib.util
    return [n for n in names if importlib.util.find_spec(n) is None]


# ------------------------------------------------------------------------------------------- sizes
@dataclass
class Sizes:
    """What each step runs on. GPU sizes are budgeted for an H100 to finish in under 8 minutes (the
    printed durations show where the time goes); CPU sizes for 2 busy cores in under 2 minutes."""
    gpu: bool
    device: str
    models: dict                   # slot -> model name
    frames: int = 8
    video_size: int = 256          # synthetic videos, resized and center-cropped to the model's 224
    video_frames: int = 32
    classes: int = 12              # synthetic classes (even: time-reversed pairs), 3 videos each, 2 train + 1 val:
                                   # distinct files; manifests cycle through the train ones under distinct ids
    pipeline_clips: dict = field(default_factory=dict)   # (slot, taps) -> clips the pipeline extracts
    ceiling_seconds: float = 4.0
    forward_batch: int = 64
    forward_iters: int = 20
    tuning_batches: tuple = (32, 64, 128, 256)
    compile_slots: tuple = ("B16",)      # torch.compile / CUDA graphs: minutes per model, so B/16 only
    decode_workers: int = 1
    stage2_clips: int = 256
    stage2_batch: int = 32
    online_clips: int = 64
    profile_steps: int = 20
    dist_steps: int = 20
    timed_epochs: int = 2          # epochs timed per step-time figure, after one warm-up epoch

    @classmethod
    def create(cls, gpu: bool) -> Sizes:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
        if gpu:
            return cls(True, "cuda", {"B16": "ViT-B/16", "L14": "ViT-L/14"},
                       pipeline_clips={("B16", "cls"): 1536, ("B16", "last4"): 768, ("L14", "cls"): 768,
                                       ("L14", "last4"): 512},
                       decode_workers=max(1, min(14, cores - 2)))
        return cls(False, "cpu", {"B16": TINY, "L14": TINY}, video_size=64, video_frames=16, classes=2,
                   pipeline_clips={(s, t): 16 for s in ("B16", "L14") for t in ("cls", "last4")},
                   ceiling_seconds=1.0, forward_batch=16, forward_iters=3, tuning_batches=(8, 16),
                   decode_workers=1, stage2_clips=24, stage2_batch=8, online_clips=8, profile_steps=3, dist_steps=3,
                   timed_epochs=1)


EVL = {"layers": 4, "tca": False}   # the last 4 blocks (what `last:4` caches; TCA would need block 8's input too)
TINY = "cachefeat-tiny-ViT"      # the tiny registered ViT the tests use (tests/conftest.py), in both slots
TAPS = {"cls": ("all", "cls"), "last4": ("last:4", "all")}     # (--layers, --tokens)


# ------------------------------------------------------------------------------------------- helpers
class Log:
    """Prints and keeps every line (written to the .log next to the JSON)."""

    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, *parts):
        line = " ".join(str(p) for p in parts)
        print(line, flush=True)
        self.lines.append(line)


def sync(device: str) -> None:
    import torch
    if device == "cuda":
        torch.cuda.synchronize()


def _rate(fn, n_items: int, iters: int, device: str, warmup: int = 2) -> float:
    """Items per second of `fn()` (which handles n_items), median of `iters` timed calls after warm-ups."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return n_items / statistics.median(times)


def _oneline(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def _manifest(videos, n: int, classes):
    """`n` rows cycling through the synthetic files under distinct ids (the same files, page cache warm)."""
    from cachefeat.extract.manifest import Manifest
    rows = [replace(videos[i % len(videos)], video_id=f"v{i}") for i in range(n)]
    return Manifest(rows, list(classes), "list", "gpu-check", "0" * 64)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------- steps
def step_tests(sz: Sizes, log: Log) -> dict:
    """tests/test_gpu.py under pytest, in its own process; its summary line parsed."""
    import importlib.util
    if importlib.util.find_spec("pytest") is None:
        return {"skipped": "pytest is not installed"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    tail = (res.stdout + res.stderr).strip().splitlines()
    summary = next((line for line in reversed(tail) if re.search(r"\d+ (passed|failed|skipped|error)", line)), "")
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", summary)}
    log(f"  pytest tests/test_gpu.py: {summary.strip('= ') or 'no summary line'} (exit {res.returncode})")
    if res.returncode not in (0, 5):
        for line in tail[-15:]:
            log("    " + line)
    return {"exit_code": res.returncode, "summary": summary.strip("= "), **counts}


def step_stage_one(sz: Sizes, data: Path, work: Path, log: Log) -> dict:
    from bench_io import _decoders, _writer_and_raw

    from cachefeat.extract.backbone import load_backbone
    from cachefeat.extract.decode_pool import DecodePool
    from cachefeat.extract.manifest import load_manifest
    from cachefeat.extract.pipeline import extract
    from cachefeat.extract.plan import ExtractSettings, plan
    from cachefeat.specs import parse_layers, parse_tokens
    from cachefeat.store import DEFAULT_CODEC

    man = load_manifest(str(data / "train.txt"), classes=str(data / "classes.txt"))
    videos, classes = man.videos, man.classes
    out, decode_fps = {}, None
    for slot, model in sz.models.items():
        twin = next((s for s, m in sz.models.items() if m == model and s != slot and f"{s}/cls" in out), None)
        if twin:      # CPU mode: both slots hold the tiny model, so the same layouts: measured once
            for taps in TAPS:
                out[f"{slot}/{taps}"] = {**out[f"{twin}/{taps}"], "same_as": f"{twin}/{taps}"}
            log(f"  {slot} = {model}: the same model as {twin}, its figures reused")
            continue
        t_model = time.perf_counter()
        bb = load_backbone(model, "none", sz.device)
        log(f"  {slot} = {model} ({bb.tower.family}, {bb.depth} blocks, width {bb.width}, grid {bb.patch_grid}, "
            f"{bb.preprocessing.size[0]} px, precision {bb.precision}): built in {time.perf_counter() - t_model:.1f} s")
        if decode_fps is None:   # the decoders' ceiling depends on the videos and the crop only: once
            with DecodePool(sz.decode_workers) as pool:
                _decoders(pool, videos, bb, sz.frames, min(1.0, sz.ceiling_seconds))       # warm-up
                d = _decoders(pool, videos, bb, sz.frames, sz.ceiling_seconds)
            decode_fps = d["frames"] / d["seconds"]
            log(f"  decoders alone ({sz.decode_workers} workers): {decode_fps:.0f} frames/s")
        size = bb.preprocessing.size
        for taps, (layers, tokens) in TAPS.items():
            key = f"{slot}/{taps}"
            settings = ExtractSettings(model=model, layers=layers, tokens=tokens, frames=sz.frames, text=False,
                                       codec=DEFAULT_CODEC, device=sz.device)
            n = sz.pipeline_clips[(slot, taps)]
            manifest = _manifest(videos, n, classes)
            p = plan(settings, manifest, bb)
            frame_bytes = sum(p.layout.bytes_per_clip().values()) / p.layout.frames
            # the bare forward: same taps, batch and precision, frames already cropped on the device
            lay, tok = parse_layers(layers, bb.depth), parse_tokens(tokens, bb.patch_grid)
            pixels = _pixels(sz.forward_batch, size, sz.device)
            forward_fps = _forward_rate(bb, pixels, lay, tok, sz)
            folder = work / "writer"
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            writer_mib = _writer_and_raw(folder, settings, p, sz.ceiling_seconds, True)["writer"]
            shutil.rmtree(folder, ignore_errors=True)
            writer_fps = writer_mib * 2 ** 20 / frame_bytes
            cache = work / f"pipeline-{slot}-{taps}.zarr"
            shutil.rmtree(cache, ignore_errors=True)
            stats = extract(manifest, cache, settings, batch_size=sz.forward_batch, decode_workers=sz.decode_workers,
                            progress=False, log=lambda *a: None)
            shutil.rmtree(cache, ignore_errors=True)
            if stats.failed_videos:
                raise RuntimeError(f"{stats.failed_videos} synthetic videos failed to decode")
            pipe_fps = stats.frames / stats.seconds
            ceilings = {"bare forward": forward_fps, "decoders alone": decode_fps, "writer alone": writer_fps}
            limit = min(ceilings, key=ceilings.get)
            eff = pipe_fps / ceilings[limit]
            out[key] = {"model": model, "layers": layers, "tokens": tokens, "frames": sz.frames,
                        "image_size": list(size), "precision": bb.precision, "batch_size": sz.forward_batch,
                        "clips": n, "bytes_per_frame": frame_bytes, "pipeline_frames_per_s": pipe_fps,
                        "pipeline_bottleneck": stats.bottleneck(), "forward_frames_per_s": forward_fps,
                        "decoders_frames_per_s": decode_fps, "writer_frames_per_s": writer_fps,
                        "writer_mib_s": writer_mib, "limiting_ceiling": limit, "efficiency": eff, "goal": 0.9,
                        # the decoders alone crop in the workers (PIL); the pipeline on a GPU crops on the device
                        "decoders_crop": "workers"}
            log(f"  {key}: pipeline {pipe_fps:.0f} frames/s; ceilings: forward {forward_fps:.0f}, decoders "
                f"{decode_fps:.0f}, writer {writer_fps:.0f} ({writer_mib:.0f} MiB/s of {frame_bytes / 2 ** 20:.2f} "
                f"MiB/frame): efficiency {eff:.2f} against {limit} (pipeline time: {stats.bottleneck()})")
        del bb
        _empty_cache(sz.device)
    return out


def _forward_rate(bb, pixels, layers, tokens, sz: Sizes) -> float:
    return _rate(lambda: bb.features(pixels, layers, tokens), len(pixels), sz.forward_iters, sz.device)


def _pixels(n: int, size, device: str):
    import torch
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, *size, 3), dtype=torch.uint8, generator=g).to(device)


def _empty_cache(device: str) -> None:
    import gc

    import torch
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def step_tuning(sz: Sizes, log: Log) -> dict:
    """The bare forward of (b) `last:4 --tokens all` under each variant, one change from the default
    (the pipeline's precision, SDPA as PyTorch picks it, batch sz.forward_batch) at a time."""
    rows = []
    for slot, model in sz.models.items():
        twin = next((r["model_slot"] for r in rows if r["model"] == model), None)
        if twin:      # CPU mode: the tiny model in both slots, measured once
            rows += [{**r, "model_slot": slot, "same_as": twin} for r in rows if r["model_slot"] == twin]
            log(f"  {slot} = {model}: the same model as {twin}, its rows reused")
            continue
        _tune_model(slot, model, sz, log, rows)
        _empty_cache(sz.device)           # the model is gone with the call: free its memory before the next
    for slot in sz.models:
        ok = [r for r in rows if r["model_slot"] == slot and "frames_per_s" in r]
        base = next((r["frames_per_s"] for r in ok if r["variant"] == "default"), None)
        for r in ok:
            r["vs_default"] = r["frames_per_s"] / base if base else None
    best = {s: max((r for r in rows if r["model_slot"] == s and "frames_per_s" in r), key=lambda r: r["frames_per_s"],
                   default={}).get("variant") for s in sz.models}
    return {"rows": rows, "best": best, "tokens": "all", "layers": "last:4"}


def _tune_model(slot: str, model: str, sz: Sizes, log: Log, rows: list) -> None:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from cachefeat.extract.backbone import load_backbone
    from cachefeat.specs import parse_layers, parse_tokens

    bb = load_backbone(model, "none", sz.device)
    lay, tok = parse_layers("last:4", bb.depth), parse_tokens("all", bb.patch_grid)
    default_prec, run = bb.precision, bb.tower.run

    def measure(name, batch=sz.forward_batch, precision=default_prec, sdpa=True, compiled=None, why=""):
        row = {"model_slot": slot, "model": model, "variant": name, "batch_size": batch,
               "precision": precision, "sdpa": sdpa}
        if why:
            rows.append({**row, "skipped": why})
            log(f"  {slot} {name}: skipped ({why})")
            return
        t0 = time.perf_counter()
        try:
            bb.precision = precision
            if compiled:
                bb.tower.run = torch.compile(run, **compiled)
            pixels = _pixels(batch, bb.preprocessing.size, sz.device)

            def fwd():
                if sdpa:
                    return bb.features(pixels, lay, tok)
                with sdpa_kernel([SDPBackend.MATH]):
                    return bb.features(pixels, lay, tok)
            row["frames_per_s"] = _rate(fwd, batch, sz.forward_iters, sz.device, warmup=3 if compiled else 2)
        except Exception as e:     # a variant that fails is a row of the table, not the end of the check
            row["failed"] = _oneline(e)
        finally:
            bb.precision, bb.tower.run = default_prec, run
            if compiled:
                torch._dynamo.reset()
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        got = f"{row['frames_per_s']:.0f} frames/s" if "frames_per_s" in row else f"failed: {row['failed']}"
        log(f"  {slot} {name}: {got} ({row['seconds']} s)")

    measure("default")
    measure("sdpa off (math kernel)", sdpa=False)
    for prec in ("fp16", "bf16", "fp32"):
        if prec == default_prec:
            continue
        why = "fp16 autocast needs a GPU" if prec == "fp16" and not sz.gpu else ""
        measure(f"precision {prec}", precision=prec, why=why)
    for b in sz.tuning_batches:
        if b != sz.forward_batch:
            measure(f"batch {b}", batch=b)
    if slot in sz.compile_slots:
        # on CPU the eager backend: the compile path is exercised, inductor's C++ build (minutes) is not
        measure("torch.compile", compiled={} if sz.gpu else {"backend": "eager"})
        measure("CUDA graphs (compile reduce-overhead)", compiled={"mode": "reduce-overhead"},
                why="" if sz.gpu else "CUDA graphs need CUDA")
    else:
        for name in ("torch.compile", "CUDA graphs (compile reduce-overhead)"):
            measure(name, why=f"compiled on {', '.join(sz.compile_slots)} only (time budget)")


def step_nvdec(sz: Sizes, log: Log) -> dict:
    import importlib.util
    found = [m for m in ("PyNvVideoCodec", "torchcodec") if importlib.util.find_spec(m) is not None]
    why = ("cachefeat extract has no --decoder nvdec yet (the GPU decoder is not built); "
           f"GPU decoder libraries present: {', '.join(found) or 'none (PyNvVideoCodec, torchcodec)'}")
    log(f"  --decoder nvdec: skipped ({why})")
    return {"skipped": why, "libraries": found}


def step_stage_two(sz: Sizes, data: Path, work: Path, log: Log) -> dict:
    import torch

    from cachefeat.extract.backbone import load_backbone
    from cachefeat.extract.manifest import load_manifest
    from cachefeat.extract.pipeline import extract
    from cachefeat.extract.plan import ExtractSettings
    from cachefeat.specs import parse_pixels
    from cachefeat.store import DEFAULT_CODEC
    from cachefeat.train import TrainConfig, open_run
    from cachefeat.train.evaluate import to_device
    from cachefeat.train.online import OnlineSource

    model = sz.models["B16"]
    man = load_manifest(str(data / "train.txt"), classes=str(data / "classes.txt"))
    bb = load_backbone(model, "none", sz.device)
    gh = bb.patch_grid[0]
    # what temporal, evl (last 4 blocks) and dist (pixels at a multiple of the token grid) read
    settings = ExtractSettings(model=model, layers="last:4", tokens="all", frames=sz.frames, text=False,
                               codec=DEFAULT_CODEC, device=sz.device, pixels=parse_pixels(f"{2 * gh}x2"))
    cache = work / "stage2.zarr"
    shutil.rmtree(cache, ignore_errors=True)
    t0 = time.perf_counter()
    extract(_manifest(man.videos, sz.stage2_clips, man.classes), cache, settings, batch_size=sz.forward_batch,
            decode_workers=sz.decode_workers, progress=False, log=lambda *a: None)
    log(f"  stage-two cache: {sz.stage2_clips} clips of {model}, last:4 all tokens, pixels {2 * gh}x2, "
        f"{sz.frames} frames ({time.perf_counter() - t0:.1f} s)")
    device = torch.device(sz.device)
    out = {"model": model, "clips": sz.stage2_clips, "batch_size": sz.stage2_batch, "frames": sz.frames}

    def open_(adapter, opts=None, path=cache):
        cfg = TrainConfig(adapter=adapter, adapter_opts=opts or {}, epochs=1, batch_size=sz.stage2_batch,
                          device=sz.device, in_memory="yes", seed=0)
        return open_run(cfg, str(path))

    # reading into GPU memory: as training does, and through page-locked buffers on a side stream
    run = open_("evl", EVL)
    batches = list(run.train_source.batches(0, train=True))
    nbytes = sum(v.nbytes for b in batches for k, v in b.items() if k in ("cls", "tokens", "embed"))
    clips = sum(len(b["label"]) for b in batches)

    def as_training():
        for b in run.train_source.batches(0, train=True):
            to_device(b, device, run.spec)

    read = _rate(as_training, clips, 3, sz.device, warmup=1)
    pinned = _pinned_rate(batches, device, sz.device)
    out["reader"] = {"clips_per_s": read, "gib_per_s": read * nbytes / clips / 2 ** 30,
                     "pinned_async_gib_per_s": pinned, "bytes_per_clip": nbytes / clips,
                     "pinned": device.type == "cuda"}
    log(f"  reader into {sz.device} memory (evl's arrays, {nbytes / clips / 2 ** 20:.1f} MiB/clip): as training "
        f"does {read:.0f} clips/s ({out['reader']['gib_per_s']:.2f} GiB/s); page-locked + async "
        f"{pinned:.2f} GiB/s" + ("" if device.type == "cuda" else " (CPU: plain copies, nothing to pin)"))

    # step time per adapter, cached
    steps = {}
    for adapter, opts in (("temporal", {}), ("evl", EVL), ("dist", {})):
        r = open_(adapter, opts)
        steps[adapter] = _step_seconds(r, sz)
        log(f"  {adapter}: {1000 * steps[adapter]:.1f} ms per step of {sz.stage2_batch} clips (cached)")
    out["step_seconds"] = steps

    # cached vs online at equal settings: evl on a small cache of its own, from the cache and with decoding
    # and the backbone in the loop (OnlineSource: the same plan and batches)
    small = work / "online.zarr"
    shutil.rmtree(small, ignore_errors=True)
    extract(_manifest(man.videos, sz.online_clips, man.classes), small, settings, batch_size=sz.forward_batch,
            decode_workers=sz.decode_workers, progress=False, log=lambda *a: None)
    r = open_("evl", EVL, path=small)
    cached = _step_seconds(r, sz)
    r.train_source = OnlineSource(r.train_cache, r.needs, sz.stage2_batch, 0, backbone=bb,
                                  decode_workers=sz.decode_workers)
    online = _step_seconds(r, sz, epochs=1)
    shutil.rmtree(small, ignore_errors=True)
    out["online_vs_cached"] = {"adapter": "evl", "clips": sz.online_clips, "cached_step_seconds": cached,
                               "online_step_seconds": online, "ratio": online / cached}
    log(f"  evl on {sz.online_clips} clips: cached {1000 * cached:.1f} ms per step, online (decode + backbone in "
        f"the loop) {1000 * online:.1f} ms: {online / cached:.1f}x")
    del bb
    _empty_cache(sz.device)

    # busy share during cached evl training
    out["busy"] = _busy_share(open_("evl", EVL), sz)
    b = out["busy"]
    log(f"  evl cached training: {b['method']} busy {b['busy_share']:.2f} of the time "
        f"(waiting for batches {b['data_wait_share']:.2f}; goal 0.9)")
    return out


def _pinned_rate(batches, device, dev: str) -> float:
    """GiB/s of the same batches copied from page-locked host buffers on a side stream (GPU), or plain
    copies (CPU)."""
    import torch
    arrays = [torch.as_tensor(v) for b in batches for k, v in b.items() if k in ("cls", "tokens", "embed")]
    nbytes = sum(a.numel() * a.element_size() for a in arrays)
    if device.type != "cuda":
        return _rate(lambda: [a.clone() for a in arrays], nbytes, 3, dev, warmup=1) / 2 ** 30
    host = [a.pin_memory() for a in arrays]
    stream = torch.cuda.Stream()

    def copy():
        with torch.cuda.stream(stream):
            outs = [h.to(device, non_blocking=True) for h in host]
        stream.synchronize()
        return outs
    return _rate(copy, nbytes, 5, dev) / 2 ** 30


def _make_step(run, sz: Sizes, net=None):
    import torch

    from cachefeat.devices import resolve_precision
    from cachefeat.train.loop import Step, param_groups
    device = torch.device(sz.device)
    precision = resolve_precision(run.cfg.precision, device, gpu_auto="bf16")
    run.model.to(device)
    opt = torch.optim.AdamW(param_groups(run.model, 0.05), lr=1e-4, fused=True)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    spe = run.train_source.steps(0, train=True)
    return Step(net or run.model, opt, scaler, device, precision, 0, 100 * spe, spe)


def _step_seconds(run, sz: Sizes, epochs: int | None = None, part=None) -> float:
    """Seconds per optimizer step of train_epoch (the loop `cachefeat train` runs), after one warm-up epoch."""
    from cachefeat.train.loop import Part, train_epoch
    st = _make_step(run, sz)
    part = part or Part()
    train_epoch(run, st, 0, part)
    sync(sz.device)
    t0, n = time.perf_counter(), 0
    for e in range(1, (epochs or sz.timed_epochs) + 1):
        _, losses = train_epoch(run, st, e, part)
        n += len(losses)
    sync(sz.device)
    return (time.perf_counter() - t0) / max(n, 1)


def _busy_share(run, sz: Sizes) -> dict:
    """The share of cached evl training's wall time the compute device is busy. GPU: the union of the
    CUDA kernels' intervals in the profiler's trace over the wall time; CPU: 1 - the share spent waiting
    for batches. Both report the waiting share."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from cachefeat.train.loop import train_epoch
    st = _make_step(run, sz)
    train_epoch(run, st, 0)              # warm-up (allocator, kernels chosen)
    inner, waited = run.train_source.batches, [0.0]

    def timed_batches(epoch, train):
        it = iter(inner(epoch, train))
        while True:
            t0 = time.perf_counter()
            try:
                b = next(it)
            except StopIteration:
                return
            waited[0] += time.perf_counter() - t0
            yield b
    run.train_source.batches = timed_batches
    epochs = max(1, -(-sz.profile_steps // st.steps_per_epoch))
    gpu = sz.device == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    sync(sz.device)
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for e in range(1, epochs + 1):
            train_epoch(run, st, e)
        sync(sz.device)
        wall = time.perf_counter() - t0
    wait = waited[0] / wall
    res = {"wall_seconds": wall, "epochs": epochs, "data_wait_share": wait}
    if gpu:
        spans = sorted((ev.time_range.start, ev.time_range.end) for ev in prof.events()
                       if ev.device_type == torch.autograd.DeviceType.CUDA and ev.time_range.end > ev.time_range.start)
        busy, end = 0, None
        for s, e in spans:            # union of intervals, in microseconds
            if end is None or s > end:
                busy += e - s
                end = e
            elif e > end:
                busy += e - end
                end = e
        res.update(method="GPU kernels (profiler)", busy_share=min(1.0, busy / 1e6 / wall))
    else:
        res.update(method="CPU: not waiting for batches", busy_share=1.0 - wait)
    return res


def step_distributed(sz: Sizes, data: Path, work: Path, log: Log) -> dict:
    """The data-parallel training step: DDP over a torch.distributed group of one process (nccl on a GPU),
    against the same step without DDP; Ray Train when Ray is present (GPU mode)."""
    import importlib.util

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from cachefeat.extract.manifest import load_manifest
    from cachefeat.extract.pipeline import extract
    from cachefeat.extract.plan import ExtractSettings
    from cachefeat.store import DEFAULT_CODEC
    from cachefeat.train import TrainConfig, open_run
    from cachefeat.train.loop import Part, train_epoch

    model = sz.models["B16"]
    man = load_manifest(str(data / "train.txt"), classes=str(data / "classes.txt"))
    cache = work / "stage2.zarr"            # stage two's, when that step ran; else one made here
    if not (cache / "zarr.json").is_file():
        settings = ExtractSettings(model=model, layers="last:4", tokens="all", frames=sz.frames, text=False,
                                   codec=DEFAULT_CODEC, device=sz.device)
        extract(_manifest(man.videos, max(sz.stage2_batch * 4, sz.dist_steps), man.classes), cache, settings,
                batch_size=sz.forward_batch, decode_workers=sz.decode_workers, progress=False, log=lambda *a: None)
    cfg = TrainConfig(adapter="evl", adapter_opts=EVL, epochs=1, batch_size=sz.stage2_batch,
                      device=sz.device, in_memory="yes", seed=0)
    backend = "nccl" if sz.gpu else "gloo"
    out = {"backend": backend, "world_size": 1, "adapter": "evl"}
    if sz.gpu and not dist.is_nccl_available():
        out["skipped"] = "this PyTorch has no nccl"
        log(f"  distributed: skipped ({out['skipped']})")
        return out
    plain = _step_seconds(open_run(cfg, str(cache)), sz)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        run = open_run(cfg, str(cache))
        run.model.to(sz.device)
        ids = [torch.device(sz.device).index or 0] if sz.gpu else None
        net = DistributedDataParallel(run.model, device_ids=ids)
        st = _make_step(run, sz, net=net)
        train_epoch(run, st, 0, Part(0, 1))
        sync(sz.device)
        t0, n = time.perf_counter(), 0
        for e in range(1, sz.timed_epochs + 1):
            _, losses = train_epoch(run, st, e, Part(0, 1))
            n += len(losses)
        sync(sz.device)
        ddp = (time.perf_counter() - t0) / n
        finite = all(torch.isfinite(torch.as_tensor(losses)).tolist())
    finally:
        dist.destroy_process_group()
    out.update(ddp_step_seconds=ddp, plain_step_seconds=plain, overhead=ddp / plain, losses_finite=finite)
    log(f"  DDP ({backend}, world 1, tcp localhost): {1000 * ddp:.1f} ms per evl step vs {1000 * plain:.1f} ms "
        f"without DDP ({ddp / plain:.2f}x); losses finite: {finite}")
    if importlib.util.find_spec("ray") is None:
        out["ray_train"] = {"skipped": "Ray is not installed"}
    elif not sz.gpu:
        out["ray_train"] = {"skipped": "CPU mode: Ray Train's start-up is left to tests/test_train_distributed.py"}
    else:
        out["ray_train"] = _ray_train(cfg, cache, work)
    r = out["ray_train"]
    log("  Ray Train: " + (f"skipped ({r['skipped']})" if "skipped" in r else
                          f"{r.get('seconds', 0):.1f} s for one epoch on 1 worker" if "failed" not in r else
                          f"failed ({r['failed']})"))
    shutil.rmtree(cache, ignore_errors=True)
    return out


def _ray_train(cfg, cache: Path, work: Path) -> dict:
    from cachefeat.train.distributed import train_distributed
    t0 = time.perf_counter()
    try:
        s = train_distributed(replace(cfg, device="cuda"), str(cache), None, str(work / "ray-run"), False, 1,
                              log=lambda *a: None)
    except Exception as e:
        return {"failed": _oneline(e)}
    return {"seconds": time.perf_counter() - t0, "final": s.get("final")}


# ------------------------------------------------------------------------------------------- report
def summary_table(res: dict) -> str:
    rows = [("step", "figure", "value")]
    for name, s in res["steps"].items():
        rows.append((name, "duration", f"{s['seconds']:.1f} s" + (f" FAILED: {s['failed']}" if "failed" in s else "")))
    t = res.get("tests", {})
    if t:
        rows.append(("tests", "test_gpu.py", t.get("summary") or t.get("skipped", "")))
    for key, r in res.get("stage_one", {}).items():
        rows.append(("stage one", f"{key} efficiency", f"{r['efficiency']:.2f} of {r['limiting_ceiling']} "
                     f"({r['pipeline_frames_per_s']:.0f} of {min(r['forward_frames_per_s'], r['decoders_frames_per_s'], r['writer_frames_per_s']):.0f} frames/s)"))  # noqa: E501
    for r in res.get("tuning", {}).get("rows", []):
        val = (f"{r['frames_per_s']:.0f} frames/s ({r['vs_default']:.2f}x)" if "frames_per_s" in r else
               f"skipped: {r['skipped']}" if "skipped" in r else f"failed: {r['failed']}")
        rows.append(("tuning", f"{r['model_slot']} {r['variant']}", val))
    if "nvdec" in res:
        rows.append(("nvdec", "--decoder nvdec", "skipped: " + res["nvdec"].get("skipped", "")))
    s2 = res.get("stage_two", {})
    if "reader" in s2:
        rows.append(("stage two", "reader", f"{s2['reader']['gib_per_s']:.2f} GiB/s as training; pinned+async "
                     f"{s2['reader']['pinned_async_gib_per_s']:.2f} GiB/s"))
        for a, v in s2["step_seconds"].items():
            rows.append(("stage two", f"{a} step", f"{1000 * v:.1f} ms"))
        o = s2["online_vs_cached"]
        rows.append(("stage two", "evl online / cached", f"{o['ratio']:.1f}x"))
        rows.append(("stage two", "evl busy share", f"{s2['busy']['busy_share']:.2f} ({s2['busy']['method']})"))
    d = res.get("distributed", {})
    if "ddp_step_seconds" in d:
        rows.append(("distributed", f"DDP {d['backend']} step", f"{1000 * d['ddp_step_seconds']:.1f} ms "
                     f"({d['overhead']:.2f}x plain)"))
        rr = d.get("ray_train", {})
        rows.append(("distributed", "Ray Train", f"skipped: {rr['skipped']}" if "skipped" in rr else str(rr)))
    for name, why in res.get("skips", {}).items():
        rows.append(("skipped", name, why))
    w = [max(len(r[i]) for r in rows) for i in range(2)]
    lines = [f"{a:<{w[0]}}  {b:<{w[1]}}  {c}" for a, b, c in rows]
    lines.insert(1, "-" * min(120, max(len(x) for x in lines)))
    return "\n".join(lines)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "gpu"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=HERE / "results", help="folder for the JSON and .log")
    ap.add_argument("--cpu", action="store_true", help="CPU mode (toy sizes) even where CUDA is present")
    ap.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, removed at the end)")
    ap.add_argument("--skip", default="", help="comma-separated steps to leave out (tests, stage_one, tuning, "
                                               "nvdec, stage_two, distributed)")
    args = ap.parse_args(argv)
    site = setup_path()
    missing = missing_modules()
    if missing:
        print(f"gpu_check: missing {', '.join(missing)} (cachefeat needs them): run benchmarks/gpu_wheels.sh on a "
              f"machine with pip and carry benchmarks/gpu-wheels", file=sys.stderr)
        return 2
    import torch

    from common import git_describe
    gpu = torch.cuda.is_available() and not args.cpu
    sz = Sizes.create(gpu)
    if not gpu:       # 2 shared cores: two torch threads waiting on each other made CPU timings erratic
        torch.set_num_threads(1)
    log = Log()
    t_all = time.perf_counter()
    card = _slug(torch.cuda.get_device_name(0)) if gpu else "cpu"
    when = _dt.datetime.now(_dt.timezone.utc)
    log(f"gpu-check on {torch.cuda.get_device_name(0) if gpu else 'CPU'}" +
        ("" if gpu else " -- CPU MODE: no CUDA (or --cpu), every step at toy sizes, figures say nothing of a GPU"))
    res = {"mode": "gpu" if gpu else "cpu", "card": card, "date": when.isoformat(timespec="seconds"),
           "git_describe": git_describe(), "machine": _machine(gpu), "vendored_site": str(site) if site else None,
           "sizes": {k: (v if not isinstance(v, dict) else {str(kk): vv for kk, vv in v.items()})
                     for k, v in sz.__dict__.items()},
           "steps": {}, "skips": {}}
    for name in ("ray", "decord", "PyNvVideoCodec", "torchcodec"):
        if missing_modules((name,)):
            res["skips"][name] = f"{name} is not installed"
            log(f"skip: {name} is not installed")
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    try:
        from cachefeat.synth import generate
        data = work / "videos"
        t0 = time.perf_counter()
        generate(data, num_classes=sz.classes, videos_per_class=3, frames=sz.video_frames,
                 size=sz.video_size, seed=0, progress=False, val_fraction=0.34)
        res["steps"]["videos"] = {"seconds": time.perf_counter() - t0}
        log(f"[videos] synthetic videos of {sz.video_size} px, {sz.video_frames} frames: "
            f"{time.perf_counter() - t0:.1f} s")
        steps = {"tests": lambda: step_tests(sz, log), "stage_one": lambda: step_stage_one(sz, data, work, log),
                 "tuning": lambda: step_tuning(sz, log), "nvdec": lambda: step_nvdec(sz, log),
                 "stage_two": lambda: step_stage_two(sz, data, work, log),
                 "distributed": lambda: step_distributed(sz, data, work, log)}
        for name, fn in steps.items():
            if name in skip:
                res["skips"][name] = "--skip"
                continue
            log(f"[{name}]")
            t0 = time.perf_counter()
            try:
                res[name] = fn()
            except Exception as e:     # one failed step is reported, the others still run
                res["steps"][name] = {"seconds": time.perf_counter() - t0, "failed": _oneline(e)}
                log(f"  FAILED: {_oneline(e)}")
                log(traceback.format_exc())
                continue
            res["steps"][name] = {"seconds": time.perf_counter() - t0}
            log(f"  ({name}: {time.perf_counter() - t0:.1f} s)")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    res["seconds"] = time.perf_counter() - t_all
    log("")
    log(summary_table(res))
    log(f"total {res['seconds']:.0f} s" + ("" if gpu else " (CPU mode)"))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{card}-{when:%Y%m%d-%H%M}-gpu"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    stem.with_suffix(".log").write_text("\n".join(log.lines) + "\n")
    print(f"wrote {stem}.json and .log")
    failed = [n for n, s in res["steps"].items() if "failed" in s]
    return 1 if failed else 0


def _machine(gpu: bool) -> dict:
    import platform

    import torch
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "platform": platform.platform()}
    if gpu:
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(p.total_memory / 2 ** 30, 1),
                    cuda=torch.version.cuda)
    return info


if __name__ == "__main__":
    sys.exit(main())
