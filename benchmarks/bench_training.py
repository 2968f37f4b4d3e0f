"""Training cost per step of one adapter configuration at the same batch, four ways:

    (a) cached      the adapter trained on features as the cache delivers them (float16 arrays in RAM)
    (b) online      the frozen backbone recomputed every step (no gradient through it), then the adapter
    (c1) finetune   full fine-tuning: gradient through the whole backbone, which AdamW also updates
    (c2) st_adapter an inserted-adapter method (ST-Adapter / AIM style, benchmarks/st_adapter.py): the
                    backbone frozen, bottleneck adapters inside every block, so the backward pass runs
                    through the whole backbone and its activations are kept

The adapter is EVL on the last 4 blocks (all tokens; TCA off, since under fine-tuning its q/k would come
from a backbone that changes). Time per step (optimizer step included) is the median of interleaved
rounds in this process; b, c1 and c2 start from frames already decoded and normalised in memory, so the
decoding they would also need is left out (their ratios to (a) are lower bounds). Peak memory is measured
per variant in a fresh process of its own (this file run as a script): GPU max_memory_allocated on GPU,
peak RSS on CPU (with the RSS of the process after importing torch, the floor every variant pays).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

VARIANTS = ("cached", "online", "finetune", "st_adapter")
ADAPTER, ADAPTER_OPTS = "evl", {"layers": 4, "tca": False}
NUM_CLASSES = 10


def settings(mode) -> dict:
    if mode.smoke:
        return {"models": ["cachefeat-tiny-ViT"], "clips": 2, "frames": 2, "rounds": 1, "threads": 1}
    if mode.full:
        return {"models": ["ViT-B/16", "ViT-L/14"], "clips": 8, "frames": 8, "rounds": 10, "threads": 0}
    # ViT-B/32 on 2 busy CPU cores runs ~3 frames/s forward: a small batch keeps this section to minutes.
    # One torch thread for every variant: on a 2-core machine shared with other work, two threads that wait
    # for each other made the timings erratic
    return {"models": ["ViT-B/32"], "clips": 2, "frames": 4, "rounds": 3, "threads": 1}


# ------------------------------------------------------------------------------------------- the variants
def _geometry(model: str) -> dict:
    import open_clip

    from cachefeat.extract.backbone import model_geometry, resolve_model_name
    geo = model_geometry(model)
    v = open_clip.get_model_config(resolve_model_name(model))["vision_cfg"]
    geo["heads"] = geo["width"] // int(v.get("head_width", 64))
    size = v["image_size"]
    geo["image_size"] = size if isinstance(size, int) else size[0]
    return geo


def _spec(geo: dict, frames: int):
    from cachefeat.adapters import FeatureSpec
    from cachefeat.specs import parse_tokens
    return FeatureSpec(num_classes=NUM_CLASSES, frames=frames, width=geo["width"], embed_dim=geo["embed_dim"],
                       depth=geo["depth"], heads=geo["heads"], layers=tuple(range(geo["depth"])),
                       tokens=parse_tokens("all", tuple(geo["patch_grid"])), patch_grid=tuple(geo["patch_grid"]))


class Variant:
    """One way of training the adapter; `step()` is one optimizer step on the same batch every time."""

    def __init__(self, kind: str, model: str, device: str, clips: int, frames: int, seed: int = 0):
        from cachefeat import adapters
        from cachefeat.devices import resolve_device, resolve_precision
        from cachefeat.train import param_groups
        self.kind, self.clips, self.frames = kind, clips, frames
        self.device = resolve_device(device)
        self.precision = resolve_precision("auto", self.device, gpu_auto="bf16")     # as `cachefeat train`: bf16 on GPU
        geo = _geometry(model)
        self.spec = _spec(geo, frames)
        torch.manual_seed(seed)
        self.adapter = adapters.build(ADAPTER, ADAPTER_OPTS, self.spec).to(self.device)
        self.taps = self.adapter.blocks_read
        K, N, D = len(self.taps), geo["patch_grid"][0] * geo["patch_grid"][1], geo["width"]
        rng = np.random.default_rng(seed)
        self.labels = torch.as_tensor(rng.integers(0, NUM_CLASSES, clips), device=self.device)
        trainable = torch.nn.ModuleDict({"adapter": self.adapter})
        self.visual = None
        if kind == "cached":
            # what CachedSource yields: float16 numpy arrays, clip axis first, time second
            self.batch = {"cls": rng.standard_normal((clips, frames, K, D), dtype=np.float32).astype(np.float16),
                          "tokens": rng.standard_normal((clips, frames, K, N, D), dtype=np.float32).astype(np.float16)}
        else:
            from cachefeat.extract.backbone import load_backbone
            bb = load_backbone(model, "none", device=str(self.device))
            self.visual = bb.visual
            s = geo["image_size"]
            g = torch.Generator().manual_seed(seed)
            self.pixels = torch.randn(clips * frames, 3, s, s, generator=g).to(self.device)   # decoded, normalised
            if kind == "finetune":
                self.visual.requires_grad_(True)
                trainable["backbone"] = self.visual
            elif kind == "st_adapter":
                from st_adapter import insert_st_adapters
                insert_st_adapters(self.visual, frames)
                trainable["backbone"] = self.visual       # only the inserted adapters require grad
            elif kind != "online":
                raise ValueError(kind)
        self.params = [p for p in trainable.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(param_groups(trainable, 0.05), lr=1e-4)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")

    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.params)

    def _backbone_features(self) -> dict[str, torch.Tensor]:
        B, T = self.clips, self.frames
        out = self.visual.forward_intermediates(self.pixels, indices=list(self.taps), output_fmt="NLC",
                                                output_extra_tokens=True, intermediates_only=True)
        cls = torch.stack([p[:, 0] for p in out["image_intermediates_prefix"]], dim=1)    # (BT, K, D)
        tok = torch.stack(out["image_intermediates"], dim=1)                              # (BT, K, N, D)
        return {"cls": cls.reshape(B, T, *cls.shape[1:]).float(), "tokens": tok.reshape(B, T, *tok.shape[1:]).float()}

    def step(self) -> float:
        from cachefeat.devices import autocast
        from cachefeat.train.evaluate import to_device
        if self.kind == "cached":
            x = to_device(self.batch, self.device, self.spec)
        elif self.kind == "online":
            with torch.no_grad(), autocast(self.device, self.precision):
                x = self._backbone_features()
        else:
            with autocast(self.device, self.precision):
                x = self._backbone_features()
        with autocast(self.device, self.precision):
            logits = self.adapter(x)
        loss = F.cross_entropy(logits.float(), self.labels, label_smoothing=0.1)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.scaler.step(self.opt)
        self.scaler.update()
        return float(loss.detach())


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


# ------------------------------------------------------------------------------------------- the section
# what the section's docs table (run.py's report) needs; `run.py --smoke` checks every one is returned
KEYS = (
    '*.device',
    '*.adapter',
    '*.adapter_opts',
    '*.clips_per_step',
    '*.frames',
    '*.precision',
    '*.variants.*.ms_per_step',
    '*.variants.*.peak_mib',
    '*.variants.*.time_over_cached',
    '*.variants.*.memory_over_cached',
    '*.variants.*.trainable_params',
)


def run(mode, log=print) -> dict:
    from common import interleaved
    st = settings(mode)
    out = {}
    for model in st["models"]:
        log(f"[training] {model}: {ADAPTER} {ADAPTER_OPTS}, {st['clips']} clips x {st['frames']} frames per step, "
            f"device {mode.device}")
        out[model] = _one_model(model, mode, st, log, interleaved)
    return out


def _one_model(model: str, mode, st: dict, log, interleaved) -> dict:
    # peak memory first, each variant in a fresh process (before this process allocates anything big)
    memory = {v: measure_memory(v, model, mode.device, st["clips"], st["frames"], threads=st["threads"])
              for v in VARIANTS}
    for v, m in memory.items():
        log(f"  {v}: " + (f"peak {m['peak_mib']:.0f} MiB ({m['what']})" if m.get("peak_mib") else f"{m.get('error')}"))
    from cachefeat.train import cpu_threads
    with cpu_threads(st["threads"]):
        return _timed(model, mode, st, log, interleaved, memory)


def _timed(model: str, mode, st: dict, log, interleaved, memory: dict) -> dict:
    variants, steps, errors = {}, {}, {}
    for v in VARIANTS:
        try:
            var = Variant(v, model, mode.device, st["clips"], st["frames"])
            var.step()                                   # warm-up, and the OOM check
            variants[v] = var
        except RuntimeError as e:
            if not _is_oom(e):
                raise
            errors[v] = "out of memory"
            torch.cuda.empty_cache()
    reps = {v: (3 if v == "cached" else 1) for v in variants}     # (a) is fast: several steps per sample
    fns = {v: (lambda var=var, n=reps[v]: [var.step() for _ in range(n)]) for v, var in variants.items()}
    med = interleaved(fns, st["rounds"], mode.device)
    for v in variants:
        steps[v] = med[v] / reps[v]
        log(f"  {v}: {1000 * steps[v]:.1f} ms/step, {variants[v].trainable_params():,} trainable parameters")
    a_t = steps.get("cached")
    a_m = (memory.get("cached") or {}).get("peak_mib")
    res = {"device": mode.device, "clips_per_step": st["clips"], "frames": st["frames"], "adapter": ADAPTER,
           "adapter_opts": ADAPTER_OPTS, "rounds": st["rounds"], "threads": st["threads"],
           "precision": next(iter(variants.values())).precision, "variants": {}}
    above = {v: m["peak_mib"] - m.get("floor_mib", 0.0) for v, m in memory.items() if m.get("peak_mib")}
    for v in VARIANTS:
        m = memory.get(v) or {}
        t = steps.get(v)
        res["variants"][v] = {
            "ms_per_step": None if t is None else 1000 * t,
            "time_over_cached": None if t is None or not a_t else t / a_t,
            "peak_mib": m.get("peak_mib"),
            "memory_over_cached": (m["peak_mib"] / a_m) if m.get("peak_mib") and a_m else None,
            "floor_mib": m.get("floor_mib"), "memory_what": m.get("what"), "above_floor_mib": above.get(v),
            "above_floor_over_cached": above[v] / above["cached"] if v in above and above.get("cached") else None,
            "trainable_params": variants[v].trainable_params() if v in variants else None,
            "error": errors.get(v) or m.get("error")}
    del variants
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return res


def measure_memory(variant: str, model: str, device: str, clips: int, frames: int, steps: int = 1,
                   threads: int = 0) -> dict:
    """Peak memory of `steps` training steps of one variant, in a process of its own."""
    here = Path(__file__).resolve().parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(here.parent), str(here), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--variant", variant, "--model", model, "--device", device,
           "--clips", str(clips), "--frames", str(frames), "--steps", str(steps), "--threads", str(threads)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {p.returncode}: {tail[0][:200]}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def _vm_hwm_mib() -> float:
    """This process's peak resident memory (VmHWM). Not getrusage's ru_maxrss: Linux carries that across
    fork and exec, so a child started by a big parent would report the parent's size."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _memory_main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(description="peak memory of one training-cost variant (run by bench_training)")
    ap.add_argument("--variant", choices=VARIANTS, required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clips", type=int, required=True)
    ap.add_argument("--frames", type=int, required=True)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    import open_clip  # noqa: F401  (the floor: torch, open_clip and cachefeat imported, nothing built)

    import cachefeat.adapters  # noqa: F401
    import cachefeat.extract.backbone  # noqa: F401
    floor = _vm_hwm_mib()
    cuda = torch.device(a.device).type == "cuda"
    try:
        var = Variant(a.variant, a.model, a.device, a.clips, a.frames)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for _ in range(a.steps):
            var.step()
    except RuntimeError as e:
        if _is_oom(e):
            print(json.dumps({"error": "out of memory"}))
            return 0
        raise
    if cuda:
        torch.cuda.synchronize()
        res = {"peak_mib": torch.cuda.max_memory_allocated() / 2 ** 20, "what": "GPU max_memory_allocated",
               "floor_mib": 0.0}
    else:
        res = {"peak_mib": _vm_hwm_mib(), "what": "peak RSS", "floor_mib": floor}
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(_memory_main())
