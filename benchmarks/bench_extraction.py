"""Extraction efficiency: how close `cachefeat extract` (decode + forward + write, pipelined) comes to the
bare backbone call on already-decoded frames, what the taps cost, and what a naive loop does.

    efficiency = extract frames/s  /  bare forward_intermediates frames/s      (goal >= 0.90 on GPU)
    taps cost  = forward with the taps / plain forward (encode_image), interleaved in one process
    naive      = decode one video, forward it, write it, next video: no overlap, per-video batches
"""
from __future__ import annotations

import copy
import math
import shutil
import time

import numpy as np
import torch
import zarr

from cachefeat.devices import autocast
from cachefeat.extract import ExtractSettings, extract
from cachefeat.extract.backbone import load_backbone
from cachefeat.extract.decode_pool import DecodePool
from cachefeat.extract.manifest import load_manifest
from cachefeat.extract.video import DecodeRequest, decode_video
from cachefeat.specs import SamplingSpec, ViewSpec, parse_layers, parse_tokens
from cachefeat.store import parse_codec

from common import WORK, Mode, interleaved, synth_data, timed

# The heaviest taps (every block, every patch token); on GPU also what EVL reads (the last 4 blocks' tokens)
# and a CLS-only cache, since on a fast GPU writing the tokens can outweigh the forward. ViT-L/14 with every
# token of every block is 12.6 MB per frame (24 TB for Kinetics-400 at 8 frames), so nobody caches that.
TAPS_QUICK = [("all", "all")]
TAPS_FULL = [("all", "all"), ("last:4", "all"), ("all", "cls")]
TAPS_SKIPPED = {("ViT-L/14", "all", "all")}


# what the section's docs table (run.py's report) needs; `run.py --smoke` checks every one is returned
KEYS = (
    '*.device',
    '*.extract_frames_per_s',
    '*.bare_frames_per_s',
    '*.efficiency',
    '*.decode_only_frames_per_s',
    '*.written_mib_per_s',
    '*.time_shares',
    '*.taps_over_plain',
    '*.naive_frames_per_s',
    '*.extract_over_naive',
)


def run(mode: Mode, log=print) -> dict:
    out = {}
    # Kinetics videos are usually stored at 340x256; the quick mode keeps the demo's small frames
    size = 256 if mode.full else 32 if mode.smoke else 96
    data = synth_data(f"extract-data-{size}", classes=6, videos_per_class=max(2, math.ceil(mode.videos / 6 / 0.75) + 1),
                      size=size)   # the train split holds 75% of the videos
    manifest = load_manifest(data / "train.txt", classes=str(data / "classes.txt"))
    for model in mode.models:
        for layers, tokens in (TAPS_FULL if mode.full else TAPS_QUICK):
            if (model, layers, tokens) in TAPS_SKIPPED:
                continue
            log(f"[extraction] {model}: {len(manifest.videos)} videos ({size} px) x {mode.frames} frames, "
                f"batch {mode.batch_size}, {mode.decode_workers} decode workers, layers {layers}, tokens {tokens}")
            key = model if (layers, tokens) == TAPS_QUICK[0] else f"{model} (layers {layers}, tokens {tokens})"
            out[key] = _one_model(model, manifest, mode, log, layers, tokens)
    return out


def _one_model(model: str, manifest, mode: Mode, log, layer_spec: str, token_spec: str) -> dict:
    bb = load_backbone(model, "none", mode.device)
    layers = parse_layers(layer_spec, bb.depth)
    tokens = parse_tokens(token_spec, bb.patch_grid)
    # at most ~4 GB written per configuration: token-heavy caches get fewer videos
    frame_bytes = 2 * bb.width * len(layers) * (1 + tokens.num_patch_tokens)
    manifest = copy.copy(manifest)
    least = mode.videos if mode.smoke else 24
    manifest.videos = manifest.videos[: max(least, min(mode.videos, int(4e9 // (frame_bytes * mode.frames))))]

    # 1. end to end: the real command's pipeline, into a fresh store
    store = WORK / f"bench-{model.replace('/', '-')}.zarr"
    shutil.rmtree(store, ignore_errors=True)
    settings = ExtractSettings(model=model, pretrained="none", layers=layer_spec, tokens=token_spec, frames=mode.frames,
                               device=mode.device, text=False)
    t0 = time.perf_counter()
    stats = extract(manifest, store, settings, batch_size=mode.batch_size, decode_workers=mode.decode_workers,
                    progress=False, log=lambda *a: None)
    wall = time.perf_counter() - t0
    e2e = stats.frames / stats.seconds
    log(f"  extract: {stats.frames} frames in {stats.seconds:.1f} s of pipeline ({wall:.1f} s with start-up): "
        f"{e2e:.1f} frames/s; bottleneck: {stats.bottleneck()}")
    write_mib_s = stats.frames * frame_bytes / 2 ** 20 / stats.seconds

    # 1b. the decoders alone (same workers, same requests): the ceiling decoding puts on the pipeline
    prep = bb.preprocessing
    with DecodePool(mode.decode_workers) as pool:
        t0 = time.perf_counter()
        for i, v in enumerate(manifest.videos):
            pool.submit(DecodeRequest(i, v.path, mode.frames, SamplingSpec(), ViewSpec(), prep))
        ok = sum(pool.get().ok for _ in manifest.videos)
        decode_fps = ok * mode.frames / (time.perf_counter() - t0)
    log(f"  decoders alone ({mode.decode_workers} workers): {decode_fps:.1f} frames/s")

    # 2. the bare backbone call with the same taps on frames decoded beforehand (same batch and device)
    decoded = [decode_video(DecodeRequest(i, v.path, mode.frames, SamplingSpec(), ViewSpec(), prep))
               for i, v in enumerate(manifest.videos)]
    pixels = torch.from_numpy(np.concatenate([d.pixels.reshape(-1, *d.pixels.shape[2:]) for d in decoded]))
    pixels = pixels.to(bb.device)
    batches = [pixels[i:i + mode.batch_size] for i in range(0, len(pixels), mode.batch_size)]
    bb.features(batches[0], layers, tokens)  # warm-up
    bare_s = timed(lambda: [bb.features(b, layers, tokens) for b in batches], mode.device)
    bare = len(pixels) / bare_s
    log(f"  bare forward_intermediates: {len(pixels)} frames in {bare_s:.1f} s: {bare:.1f} frames/s")

    # 3. the taps' own cost: plain forward vs forward with every tap, interleaved
    x = bb.normalize(batches[0])
    visual = bb.visual

    def plain():
        with torch.inference_mode(), autocast(bb.device, bb.precision):
            visual(x)

    def taps():
        with torch.inference_mode(), autocast(bb.device, bb.precision):
            visual.forward_intermediates(x, indices=layers, output_fmt="NLC", output_extra_tokens=True)

    rounds = 5 if not mode.full else 20
    med = interleaved({"plain": plain, "taps": taps}, rounds, mode.device)
    log(f"  taps vs plain forward (median of {rounds}, interleaved): {med['taps'] / med['plain']:.3f}")

    # 4. naive loop: decode a video, forward it, write it, then the next
    naive_store = WORK / "naive.zarr"
    shutil.rmtree(naive_store, ignore_errors=True)
    root = zarr.open_group(str(naive_store), mode="w")
    shapes = {"embed": (mode.frames, bb.embed_dim), "cls": (mode.frames, len(layers), bb.width)}
    if tokens.num_patch_tokens:
        shapes.update({f"tokens/{l}": (mode.frames, tokens.num_patch_tokens, bb.width) for l in layers})
    arrays = {k: root.create_array(k, shape=(len(manifest.videos), *s), chunks=(1, *s), dtype="float16",
                                   compressors=parse_codec("zstd:3")) for k, s in shapes.items()}

    naive_videos = manifest.videos[: max(4, len(manifest.videos) // 2)]   # its rate is what counts

    def naive():
        for i, v in enumerate(naive_videos):
            d = decode_video(DecodeRequest(i, v.path, mode.frames, SamplingSpec(), ViewSpec(), prep))
            f = bb.features(torch.from_numpy(d.pixels[0]), layers, tokens)
            arrays["embed"][i] = f["embed"].half().cpu().numpy()
            arrays["cls"][i] = f["cls"].half().cpu().numpy()
            if tokens.num_patch_tokens:
                toks = f["tokens"].half().cpu().numpy()
                for li, l in enumerate(layers):
                    arrays[f"tokens/{l}"][i] = toks[:, li]

    naive_s = timed(naive, mode.device)
    naive_fps = len(naive_videos) * mode.frames / naive_s
    log(f"  naive sequential loop: {naive_fps:.1f} frames/s")
    shutil.rmtree(naive_store, ignore_errors=True)
    shutil.rmtree(store, ignore_errors=True)
    return {"frames": stats.frames, "extract_frames_per_s": e2e, "extract_wall_s": wall,
            "bare_frames_per_s": bare, "efficiency": e2e / bare,
            "taps_over_plain": med["taps"] / med["plain"], "naive_frames_per_s": naive_fps,
            "extract_over_naive": e2e / naive_fps, "batch_size": mode.batch_size, "videos": len(manifest.videos),
            "decode_only_frames_per_s": decode_fps, "bytes_per_frame": frame_bytes,
            "written_mib_per_s": write_mib_s, "bottleneck": stats.bottleneck(),
            "time_shares": {"wait_decode": stats.wait_decode_s / stats.seconds,
                            "forward": stats.forward_s / stats.seconds,
                            "wait_write": stats.wait_write_s / stats.seconds},
            "decode_workers": mode.decode_workers, "device": mode.device, "layers": layer_spec, "tokens": token_spec,
            "precision": bb.precision}
