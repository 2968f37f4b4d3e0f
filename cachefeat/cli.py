"""The `cachefeat` command: one function per command, which parses its options, calls the library
(cachefeat.store, cachefeat.extract, cachefeat.train) and prints. Errors are one line (exit 2 for bad usage,
1 for a run that failed), never a traceback."""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

from . import __version__
from .fmt import human_bytes, ranges, table
from .train.config import TrainConfig

# The exit-status contract (docs/cli.md, Exit status): 0 ok; 1 the work failed or data is damaged; 2 bad usage
# or input; 130 interrupted. Every error is one line; a traceback only with `cachefeat --debug`.
# Error classes by name (module.class), so that printing an error imports nothing (torch takes seconds).
# Bad usage or input: exit status 2, unless the error is also one of _FAILURES (e.g. CacheDamaged: 1).
USAGE_ERRORS = frozenset({
    "cachefeat.specs.SpecError", "cachefeat.extract.backbone.BackboneError", "cachefeat.devices.DeviceError",
    "cachefeat.extract.manifest.ManifestError", "cachefeat.store.layout.CacheError",
    "cachefeat.adapters.base.AdapterError", "cachefeat.train.config.TrainError", "cachefeat.train.ablate.AblationError",
    "cachefeat.recipes.RecipeError", "cachefeat.ray_runtime.ClusterError", "cachefeat.yamlfile.YamlError",
    "cachefeat.extract.plan.SpaceError"})
# The work failed (a damaged cache or checkpoint, a diverged run, a dead worker): exit status 1.
FAILURES = frozenset({
    "cachefeat.errors.Failed", "cachefeat.train.config.TrainDiverged", "cachefeat.ray_runtime.WorkerError",
    "cachefeat.store.shard_file.ShardFileError"})


def _is(e: BaseException, names: frozenset) -> bool:
    return any(f"{c.__module__}.{c.__qualname__}" in names for c in type(e).__mro__)


# what an interrupted command says about continuing
_RESUME = {"extract": "run the same command again to resume", "train": "run the same command with --resume to "
           "continue from the last finished epoch", "run": "run the recipe again to continue",
           "ablate": "run it again with --overwrite (finished trials are in --out/trials)",
           "export": "run it again with --overwrite", "import": "run it again with --overwrite",
           "push": "run the same command again: it uploads only what is missing"}


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


_PARSE_ERRORS = (click.BadParameter, click.MissingParameter, click.NoSuchOption, click.BadOptionUsage,
                 click.BadArgumentUsage)


class _Unexpected(click.ClickException):
    """An error no part of cachefeat foresaw: one line naming its type, exit status 1."""

    def show(self, file=None):
        click.echo(self.message, err=True)


def _os_error(e: OSError) -> click.ClickException:
    """A file system error as one line: a place that cannot be written is bad input (2), a full disk or an
    I/O error a failed run (1)."""
    import errno
    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    what = f"{e.strerror or _one_line(e)}{where}"
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return click.UsageError(f"{what}: choose a place this user can write to, or make it writable")
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return click.ClickException(f"{what}: free some space, then run the same command again (work that finished "
                                    f"is kept)")
    return click.ClickException(f"{what}")


def _as_click_error(e: Exception, command: str) -> click.ClickException:
    if _is(e, FAILURES):
        return click.ClickException(_one_line(e))
    if _is(e, USAGE_ERRORS):
        return click.UsageError(_one_line(e), ctx=None)
    if isinstance(e, OSError):
        return _os_error(e)
    return _Unexpected(f"cachefeat {command}: unexpected {type(e).__name__}: {_one_line(e)[:500]} "
                       f"(run again with --debug for the traceback)")


class _Group(click.Group):
    def invoke(self, ctx):
        debug = bool(ctx.params.get("debug"))
        try:
            return super().invoke(ctx)
        except click.exceptions.Exit:
            raise
        except click.UsageError as e:
            if e.ctx is None or debug:
                e.message = _one_line(e.message)
                raise
            # one line, without click's usage block; for a bad option, where its help is
            hint = f" (`{e.ctx.command_path} -h` for help)" if isinstance(e, _PARSE_ERRORS) else ""
            raise click.UsageError(_one_line(e.format_message()) + hint, ctx=None) from None
        except click.ClickException as e:
            e.message = _one_line(e.message)
            raise
        except (KeyboardInterrupt, click.Abort) as e:
            if debug or (isinstance(e, click.Abort) and not isinstance(e.__context__, KeyboardInterrupt)):
                raise
            command = ctx.invoked_subcommand or ""
            click.echo(f"cachefeat {command}: interrupted; {_RESUME.get(command, 'run it again')}", err=True)
            ctx.exit(130)
        except BrokenPipeError:   # the reader of our output went away (`cachefeat info ... | head`): stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            ctx.exit(1)
        except Exception as e:
            if debug:
                raise
            # when one of zarr's concurrent reads fails, asyncio logs the others' failures as the process
            # exits ("Task exception was never retrieved", with a traceback): the one line below says it all
            logging.getLogger("asyncio").setLevel(logging.CRITICAL)
            raise _as_click_error(e, ctx.invoked_subcommand or "") from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="cachefeat")
@click.option("--debug", is_flag=True,
              help="Show the full traceback of an error instead of its one-line message (for bug reports).")
def cli(debug):
    """Extract frozen CLIP ViT features from videos once (stage one), then train and ablate video
    adapters on the cached tensors (stage two).

    Exit status: 0 ok; 1 the work failed or data is damaged; 2 bad usage or input; 130 interrupted.
    """


def main():
    cli(prog_name="cachefeat")


class _PathOrURL(click.Path):
    """A cache or manifest to read: a path that exists (click.Path's checks), or an `s3://bucket/key` URL
    (docs/object-storage.md), passed on as it is: the code that opens it checks it."""

    def __init__(self, **path_kw):
        super().__init__(exists=True, **path_kw)

    def convert(self, value, param, ctx):
        if isinstance(value, str) and value.startswith("s3://"):
            return value
        return super().convert(value, param, ctx)


# ------------------------------------------------------------------------------------------- synth
@cli.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--classes", "num_classes", default=6, show_default=True,
              help="Number of classes (even: classes come in time-reversed pairs, at most 12).")
@click.option("--videos-per-class", default=24, show_default=True, help="Videos per class, train and val together.")
@click.option("--val-fraction", default=0.25, show_default=True, help="Share of each class's videos in the val split.")
@click.option("--frames", default=32, show_default=True, help="Frames per video.")
@click.option("--size", default=96, show_default=True, help="Frame width and height in pixels.")
@click.option("--fps", default=12, show_default=True, help="Frame rate written in the files.")
@click.option("--seed", default=0, show_default=True, help="Seed: the same seed writes the same files.")
@click.option("--motions", type=click.Choice(["shapes", "alt"]), default="shapes", show_default=True,
              help="Family of motions: shapes (translate, grow, colour, turn, fade), or alt, a differently drawn "
                   "set (diagonal travel, orbits, meeting shapes, wipes, light, stretching; striped backgrounds, "
                   "a distractor).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def synth(out, num_classes, videos_per_class, val_fraction, frames, size, fps, seed, motions, quiet):
    """Write a synthetic video data set whose classes differ only in temporal order.

    Classes come in pairs that are each other's time reversal (moving right / moving left, growing /
    shrinking, ...), so a frame-averaging classifier sits at chance within each pair while a temporal
    one does not. Writes OUT/train.txt, OUT/val.txt, OUT/classes.txt and H.264 mp4 files.

    Example: cachefeat synth data/synth --classes 6 --videos-per-class 24
    """
    from .synth import generate
    try:
        s = generate(out, num_classes, videos_per_class, frames, size, seed, val_fraction, fps, progress=not quiet,
                     motions=motions)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    click.echo(f"wrote {s['train_per_class'] * num_classes} train and {s['val_per_class'] * num_classes} val videos "
               f"of {num_classes} classes to {out} (manifests: train.txt, val.txt, classes.txt)")


# ------------------------------------------------------------------------------------------- extract
def _spec(parser_name: str):
    """A click callback that parses an option with cachefeat.specs.<parser_name> (None passes through), so a
    bad value is reported by click as that option's error."""
    def callback(ctx, param, value):
        from . import specs
        if value is None:
            return None
        try:
            return getattr(specs, parser_name)(value)
        except specs.SpecError as e:
            raise click.BadParameter(str(e).split(": ", 1)[-1]) from None
    return callback


def _augment(aug_views, aug_scale, aug_ratio, no_flip, color_jitter, aug_seed, views, randaugment=None,
             flip_pairs=None, classes=None):
    from .extract.randaugment import RandAugmentConfig, RandAugmentError
    from .specs import (
        SSV2_FLIP_PAIRS,
        AugmentSpec,
        SpecError,
        ViewSpec,
        parse_color_jitter,
        parse_flip_pairs,
        parse_range,
    )
    if aug_views is None:
        if randaugment or flip_pairs:
            raise click.UsageError(f"{'--randaugment' if randaugment else '--flip-pairs'} acts on augmented training "
                                   f"views: add --aug-views K")
        return None
    if views != ViewSpec():
        raise click.UsageError("--aug-views makes random training views; it cannot be combined with --views "
                               "(test views belong in a separate eval cache)")
    if flip_pairs and no_flip:
        raise click.UsageError("--flip-pairs swaps the labels of flipped views; --no-flip turns flips off: choose one")
    try:
        ra = RandAugmentConfig.parse(randaugment).canonical() if randaugment else None
        if flip_pairs == "ssv2":
            pairs = SSV2_FLIP_PAIRS
            if classes is not None and len(classes) != 174:
                raise SpecError(f"--flip-pairs ssv2 names Something-Something v2's classes (174); this class "
                                f"list has {len(classes)}")
        elif flip_pairs:
            if not Path(flip_pairs).is_file():
                raise SpecError(f"--flip-pairs {flip_pairs}: no such file (or `ssv2` for DiST's pairs)")
            pairs = parse_flip_pairs(Path(flip_pairs).read_text(), classes, f"--flip-pairs {flip_pairs}")
        else:
            pairs = ()
    except (RandAugmentError, SpecError) as e:
        raise click.UsageError(str(e)) from None
    return AugmentSpec(aug_views, parse_range(aug_scale, "--aug-scale", 0.08, 1.0),
                       parse_range(aug_ratio, "--aug-ratio", 0.75, 1.333), not no_flip,
                       parse_color_jitter(color_jitter) if color_jitter else None, aug_seed, ra, pairs)


def _shard_size(ctx, param, value):
    if value in (None, "auto"):
        return None
    try:
        n = int(value)
        if n < 1:
            raise ValueError
        return n
    except ValueError:
        raise click.BadParameter("expected auto or a positive number of clips") from None


@cli.command()
@click.argument("input", type=_PathOrURL())
@click.option("--out", "-o", required=True, type=click.Path(),
              help="The cache to write (a Zarr v3 store, e.g. k400_train.zarr), or s3://BUCKET/PREFIX to write it "
                   "into an object store shard by shard (docs/object-storage.md).")
@click.option("--format", "fmt", type=click.Choice(["auto", "folder", "list", "kinetics", "ssv2"]), default="auto",
              show_default=True, help="How to read INPUT: a class-folder tree, a `path label` list, a Kinetics CSV, "
                                      "or a Something-Something JSON (auto: by extension).")
@click.option("--video-root", callback=lambda ctx, param, v: v if v is None or v.startswith("s3://") else
              click.Path(exists=True, file_okay=False).convert(v, param, ctx),
              help="Folder the manifest's video paths are relative to (default: the manifest's folder), or a "
                   "bucket, s3://BUCKET/PREFIX (docs/object-storage.md).")
@click.option("--classes", "classes_file", type=click.Path(exists=True, dir_okay=False),
              help="Class list (one name per line, JSON list, or JSON {name: index}); default: a classes.txt beside "
                   "INPUT, else the sorted labels found. Use the same list for train and eval caches.")
@click.option("--split", help="Keep only rows of this split (Kinetics CSV `split` column).")
@click.option("--model", "-m", default="ViT-B/16", show_default=True,
              help="open_clip model (ViT-L/14 or ViT-L-14, ViT-B-16-SigLIP2, EVA02-B-16, PE-Core-B-16), "
                   "hf-hub:ORG/REPO, local-dir:PATH, or timm:NAME for a timm ViT (timm:vit_base_patch14_reg4_dinov2). "
                   "`cachefeat models` lists the families.")
@click.option("--pretrained", default="openai", show_default=True,
              help="Weights: an open_clip tag (openai, laion2b_s34b_b88k, ...) or for timm:NAME a timm tag "
                   "(lvd142m, augreg_in21k, ...), a checkpoint file, or none for random weights from --seed. "
                   "Tags trained with QuickGELU (openai) select the QuickGELU model.")
@click.option("--trust-pretrained", is_flag=True,
              help="Load a --pretrained file that needs a full unpickle (a TorchScript archive such as OpenAI's "
                   "original CLIP .pt, a pickled module). This RUNS ANY CODE THE FILE HOLDS: only for files you "
                   "trust. Without it such files are refused; safetensors and plain state dicts need no trust.")
@click.option("--quick-gelu/--no-quick-gelu", default=None,
              help="Force QuickGELU on or off (default: from the pretrained tag). Needed for OpenAI checkpoint files.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random weights when --pretrained none.")
@click.option("--layers", default="all", show_default=True,
              help="Blocks to tap: all, last:K, or indices like 3,7,11 (negative counts from the end).")
@click.option("--tokens", default="cls", show_default=True,
              help="Kept per tapped layer: cls (class token only), all (also every patch token), or pooled:HxW "
                   "(also the patch grid average-pooled to HxW). The final embedding is always kept.")
@click.option("--frames", "-t", default=8, show_default=True, type=click.IntRange(1, 1024), help="Frames per clip.")
@click.option("--sampling", default="uniform", show_default=True, callback=_spec("parse_sampling"),
              help="uniform (TSN segments, one frame each), dense:STRIDE (consecutive frames STRIDE apart), or "
                   "fps:F (F frames per second of each video's own timeline, cut into windows of --frames "
                   "frames: every window is a clip, for dense features of long and untrimmed videos).")
@click.option("--window-stride", type=click.IntRange(1), metavar="S",
              help="With --sampling fps: windows start S samples apart (default --frames: side by side; less: "
                   "they overlap).")
@click.option("--frame-rate", type=click.FloatRange(0, min_open=True), metavar="FPS",
              help="Frame rate of frame-folder inputs (folders of JPEG/PNG frames in name order): their "
                   "timestamps are index / FPS. Needed for --sampling fps when the input has frame folders.")
@click.option("--views", default="1x1", show_default=True, callback=_spec("parse_views"),
              help="Views per video: TxS = T temporal clips x S spatial crops (S = 1 centre or 3), e.g. 3x1, 4x3.")
@click.option("--dtype", default="float16", show_default=True, callback=_spec("parse_dtype"),
              help="Storage dtype: float16, float32, or int8 (symmetric per-channel quantization, calibrated on "
                   "videos spread over the input; dequantized transparently on read).")
@click.option("--pixels", callback=_spec("parse_pixels"), metavar="SIZE[xK]",
              help="Also keep the model's crops resized to SIZExSIZE as uint8, for K times as many frames as the "
                   "backbone sees, cut from the same view (DiST's temporal encoder reads 224x2).")
@click.option("--aug-views", type=click.IntRange(1, 1024),
              help="Training cache: K random augmented views per video (random frames within segments, "
                   "random-resized crop, flips, optional colour jitter and RandAugment) instead of the test views "
                   "of --views.")
@click.option("--aug-scale", default="0.4,1.0", show_default=True,
              help="Random-resized-crop area range (with --aug-views).")
@click.option("--aug-ratio", default="0.75,1.3333", show_default=True, help="Random-resized-crop aspect-ratio range.")
@click.option("--no-flip", is_flag=True,
              help="No horizontal flips in augmented views (Something-Something's left/right classes need this).")
@click.option("--color-jitter", metavar="B,C,S,H",
              help="Colour jitter of augmented views, e.g. 0.4,0.4,0.2,0.1 (off by default).")
@click.option("--randaugment", metavar="CONFIG",
              help="RandAugment in augmented views, timm's config string: EVL's is m7-n4-mstd0.5-inc1 (7 of 10 "
                   "magnitude, 4 ops, magnitude noise 0.5, increasing ops); drawn once per view, the same ops on "
                   "every frame, before the crop.")
@click.option("--flip-pairs", metavar="ssv2|FILE",
              help="Class pairs a horizontal flip turns into each other: a flipped view of such a class is labelled "
                   "as its partner. ssv2: DiST's Something-Something v2 pairs (86-87, 93-94, 166-167); or a file "
                   "with two class indices (or two names separated by a tab) per line.")
@click.option("--aug-seed", default=0, show_default=True,
              help="Seed of the augmented views: the same seed gives the same views.")
@click.option("--text-template", default="{}", show_default=True,
              help="Prompt for the class-name text embeddings; {} is the class name, e.g. 'a video of {}.'")
@click.option("--no-text", is_flag=True, help="Do not store class-name text embeddings.")
@click.option("--codec", default="none", show_default=True,     # store.DEFAULT_CODEC (a test keeps them equal)
              help="Compression: none, zstd[:L], blosc-lz4, blosc-zstd[:L], gzip[:L] (a CRC32C checksum is always "
                   "added). Float16 features compress by ~8% at a CPU core per few hundred MiB/s, so none.")
@click.option("--batch-size", "-b", default=64, show_default=True, type=click.IntRange(1),
              help="Frames per backbone forward.")
@click.option("--shard-size", default="auto", show_default=True, callback=_shard_size,
              help="Clips per shard (the unit of writing and resuming); auto = 64, fewer when clips are large.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "fp16", "bf16"]), default="auto", show_default=True,
              help="Backbone compute precision (auto: fp16 autocast on GPU, fp32 on CPU).")
@click.option("--decode-workers", type=click.IntRange(0), default=None,
              help="Decode processes (default: the cores this process may use - 1; 0 = decode inline, no "
                   "timeout). With --workers: per worker (default: the worker's share of its node's cores - 1).")
@click.option("--workers", "-w", default=1, show_default=True, type=click.IntRange(1),
              help="Extraction workers. Above 1, Ray runs one worker per GPU (per CPU slot without GPUs), each "
                   "with its own backbone and decode processes, each writing whole shards; one that dies has "
                   "its unfinished shards redone by another. The cache is the same as with 1.")
@click.option("--address", metavar="auto|HOST:PORT",
              help="Run the workers on a running Ray cluster (`ray start --head` on one node, `ray start "
                   "--address HEAD:6379` on the others; auto = the cluster of this node) instead of starting "
                   "Ray here. --out and the videos must then be on storage every node sees at the same path, "
                   "unless they are in a bucket (s3://).")
@click.option("--decode-timeout", default=60.0, show_default=True, type=click.FloatRange(0.1),
              help="Seconds one video may take to decode before its decoder is killed and the video recorded "
                   "as failed (with --sampling fps: one request of a few windows, per minute of video it "
                   "covers).")
@click.option("--reader", type=click.Choice(["auto", "decord", "pyav"]), default="auto", show_default=True,
              help="Video reader (auto: decord, falling back to PyAV for files decord cannot read).")
@click.option("--preprocess", type=click.Choice(["auto", "workers", "device"]), default="auto", show_default=True,
              help="Where test views are resized and cropped: in the decode workers (PIL) or on the backbone's "
                   "device from the decoded frames (the same bytes, exactly; the workers then only decode). "
                   "auto: device on a GPU, workers on CPU. Augmented views are always made in the workers.")
@click.option("--no-fsync", is_flag=True,
              help="Do not force each shard onto the disk before flagging it done: faster where fsync is slow, but "
                   "after a power cut (not a crash or a kill) a shard may count as done without its data. For "
                   "scratch caches.")
@click.option("--overwrite", is_flag=True, help="Replace an existing cache at --out instead of resuming it.")
@click.option("--repair", is_flag=True,
              help="Check every chunk of the existing cache (as `cachefeat verify` does) and extract again only the "
                   "shards with damaged data.")
@click.option("--dry-run", is_flag=True, help="Print the cache's size on disk for these settings and exit.")
@click.option("--strict", is_flag=True, help="Exit with status 1 if any video failed (the cache is still written).")
@click.option("--max-failed-fraction", default=1.0, show_default=True, type=click.FloatRange(0, 1),
              help="Exit with status 1 when more than this share of the videos failed (the cache is still "
                   "written); 1 = off. A cache with no valid clip always exits with status 1.")
@click.option("--ignore-free-space", is_flag=True,
              help="Write even when the estimated cache size exceeds the free space of --out's file system "
                   "(e.g. when the codec compresses well).")
@click.option("--staging", type=click.Path(exists=True, file_okay=False),
              help="With --out s3://...: the local folder that holds the cache's documents and tables and the shard "
                   "being uploaded (a few MB plus a shard or two; default $CACHEFEAT_STAGING, else the temp folder).")
@click.option("--break-lease", is_flag=True,
              help="With --out s3://...: remove the prefix's lease first, whoever holds it: for a writer killed "
                   "before its lease expired. Never while that writer may still run.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def extract(input, out, fmt, video_root, classes_file, split, model, pretrained, trust_pretrained, quick_gelu, seed,
            layers, tokens, frames, sampling, window_stride, frame_rate, views, dtype, pixels, aug_views, aug_scale,
            aug_ratio, no_flip, color_jitter, randaugment, flip_pairs, aug_seed,
            text_template, no_text, codec, batch_size, shard_size, device, precision, decode_workers, workers, address,
            decode_timeout, reader, preprocess, no_fsync, overwrite, repair, dry_run, strict, max_failed_fraction,
            ignore_free_space, staging, break_lease, quiet):
    """Run the frozen backbone over the videos of INPUT and write their features to a cache.

    INPUT is a class-folder tree, a list, a Kinetics CSV or an SSv2 JSON, each also in a bucket: a prefix
    (s3://BUCKET/PREFIX/) for a tree, an object (s3://BUCKET/KEY) for the others, their relative names then
    under the object's folder there.

    Resumable: run the same command again after a crash and it continues with the shards not yet done.
    Videos that cannot be read are recorded in the cache (see `cachefeat info --failures`).

    Example (what EVL reads; --dry-run first shows the size: all layers with all tokens is ~24 TB for
    Kinetics-400 train at ViT-L/14): cachefeat extract k400/train.csv --out k400_train.zarr --model ViT-L/14
    --pretrained openai --layers last:5 --tokens all --frames 8
    """
    from .extract.decode_pool import default_workers
    from .extract.manifest import load_manifest
    from .extract.outcome import failure_verdict
    from .extract.pipeline import extract as run_extract
    from .extract.plan import ExtractSettings, check_free_space, dry_run_report, estimate_size
    from .store import parse_codec

    parse_codec(codec)  # validate before any work
    if overwrite and repair:
        raise click.UsageError("--repair mends an existing cache; --overwrite replaces it: choose one")
    augment = _augment(aug_views, aug_scale, aug_ratio, no_flip, color_jitter, aug_seed, views, randaugment)
    from .specs import with_windows
    sampling = with_windows(sampling, frames, window_stride, frame_rate)
    if "{}" not in text_template:
        raise click.BadParameter("the template needs {} where the class name goes", param_hint="--text-template")
    if classes_file is None and Path(input).is_file() and (Path(input).parent / "classes.txt").is_file():
        classes_file = str(Path(input).parent / "classes.txt")
    manifest = load_manifest(input, fmt, video_root, classes_file, split)
    if flip_pairs:   # class names in the file are resolved against the manifest's class list
        augment = _augment(aug_views, aug_scale, aug_ratio, no_flip, color_jitter, aug_seed, views, randaugment,
                           flip_pairs, list(manifest.classes or []) or None)
    settings = ExtractSettings(model=model, pretrained=pretrained, layers=layers, tokens=tokens, frames=frames,
                               sampling=sampling, views=views, dtype=dtype, codec=codec, shard_size=shard_size,
                               seed=seed, quick_gelu=quick_gelu, trust_pretrained=trust_pretrained, device=device,
                               precision=precision, pixels=pixels, augment=augment, text=not no_text,
                               text_template=text_template)
    if dry_run:
        click.echo(dry_run_report(settings, manifest))
        return
    if trust_pretrained and Path(pretrained).is_file():
        click.echo(f"--trust-pretrained: {pretrained} is loaded in full if it needs it, running any code it holds")
    from .store.bucket_writer import BucketOut
    from .store.remote import is_remote
    if is_remote(out):
        from .store.remote import parse_url, require_obstore
        require_obstore(out)
        target = BucketOut(parse_url(out).url, staging, break_lease)
        click.echo(f"writing to {target.url}, each shard uploaded as it is written (the bucket's free space is not "
                   f"checked)")
    else:
        if staging or break_lease:
            raise click.UsageError("--staging and --break-lease are for --out s3://...")
        target = out
        click.echo(check_free_space(estimate_size(settings, manifest), out, ignore_free_space).describe())
    if workers > 1 or address:
        stats = _extract_on_ray(manifest, target, settings, workers, address, batch_size, decode_workers,
                                decode_timeout, reader, preprocess, not no_fsync, overwrite, repair, quiet)
    else:  # one process, no Ray: nothing to start, nothing imported
        stats = run_extract(manifest, target, settings, batch_size=batch_size,
                            decode_workers=default_workers() if decode_workers is None else decode_workers,
                            decode_timeout=decode_timeout, reader=reader, overwrite=overwrite, progress=not quiet,
                            log=click.echo, repair=repair, preprocess=preprocess, fsync=not no_fsync)
    from .store import open_cache
    cache = open_cache(out)
    counts = cache.counts()
    rate = stats.clips / stats.seconds if stats.seconds else 0.0
    click.echo(f"wrote {stats.clips} clips ({stats.frames} frames) in {stats.seconds:.1f} s ({rate:.2f} clips/s); "
               f"{stats.failed_videos} videos failed")
    if stats.clips and stats.bottleneck():
        click.echo(f"bottleneck: {stats.bottleneck()}")
    if cache.windowed:
        import numpy as np
        hours = float(np.nansum(cache.read("videos/duration"))) / 3600
        click.echo(f"{out}: {cache.num_videos} videos, {hours:.2f} h of video at fps:{cache.meta['sampling']['fps']:g} "
                   f"in {cache.num_clips} windows of {cache.frames} frames")
    click.echo(f"{out}: {counts['valid_clips']} valid clips of {cache.num_clips}, "
               f"{human_bytes(counts['disk_bytes'])} on disk"
               + (f", {human_bytes(counts['bytes_per_frame_on_disk'])} per frame"
                  if counts["bytes_per_frame_on_disk"] else ""))
    if getattr(stats, "workers", None):
        click.echo(worker_report(stats))
    for video, err in stats.failures[:10]:
        click.echo(f"  failed: {cache.root['videos/path'][video]}: {err}")
    if len(stats.failures) > 10:
        click.echo(f"  ... and {len(stats.failures) - 10} more (cachefeat info {out} --failures)")
    if stats.interrupted:
        click.echo(f"stopped early: run the same command again to resume "
                   f"({int((~cache.shard_done()).sum())} shards left)")
        sys.exit(130)
    verdict = failure_verdict(cache, max_failed_fraction, video_root)
    if verdict:
        raise click.ClickException(verdict)
    if strict and (stats.failed_videos or len(cache.failures())):
        raise click.ClickException(f"{len(cache.failures())} videos failed (--strict)")


def _extract_on_ray(manifest, out, settings, workers, address, batch_size, decode_workers, decode_timeout, reader,
                    preprocess, fsync, overwrite, repair, quiet):
    if settings.device not in ("auto", "cpu", "cuda"):
        raise click.BadParameter("with --workers each worker gets its own GPU from Ray: use auto, cuda or cpu",
                                 param_hint="--device")
    from .extract.distributed import extract_distributed
    from .ray_runtime import ClusterError, WorkerError
    try:
        return extract_distributed(manifest, out, settings, workers=workers, batch_size=batch_size,
                                   decode_workers=decode_workers, decode_timeout=decode_timeout, reader=reader,
                                   overwrite=overwrite, progress=not quiet, log=click.echo, address=address,
                                   repair=repair, preprocess=preprocess, fsync=fsync)
    except ClusterError as e:
        raise click.UsageError(str(e)) from None
    except WorkerError as e:
        raise click.ClickException(f"{e} (finished shards are kept: the same command resumes)") from None


def worker_report(stats) -> str:
    """Who did what in a distributed extraction, in a line or two."""
    ran = [w for w in stats.workers if w.host]
    hosts = sorted({w.host for w in ran})
    devices = sorted({w.device for w in ran})
    line = (f"{len(ran)} worker{'s' * (len(ran) != 1)} on {len(hosts)} node{'s' * (len(hosts) != 1)} "
            f"({', '.join(hosts)}), device {', '.join(devices)}, {ran[0].decode_workers if ran else 0} decode "
            f"processes each, the first ready after {stats.ready_seconds:.1f} s")
    late = len(stats.workers) - len(ran)     # still starting when the others had finished every shard
    if late:
        line += f"; {late} more not ready before the work was done"
    if stats.worker_deaths:
        line += (f"; {stats.worker_deaths} died, {stats.shards_requeued} of their shards redone by others, "
                 f"{stats.replacements} replaced")
    return line


# ------------------------------------------------------------------------------------------- info
@cli.command()
@click.argument("cache", type=_PathOrURL())
@click.option("--failures", "show_failures", is_flag=True, help="List every failed video with its stage and reason.")
@click.option("--json", "as_json", is_flag=True, help="Print the metadata and counts as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Also write a PNG of valid and failed videos per class and failures by stage to this path.")
def info(cache, show_failures, as_json, plot_path):
    """Show what a cache holds: model, layers, tokens, sampling, counts, size on disk. CACHE is a folder or
    the s3://bucket/prefix URL of a pushed cache (docs/object-storage.md).

    Example: cachefeat info k400_train.zarr --failures
    """
    from .store import open_cache
    c = open_cache(cache)
    m, lay = c.meta, c.layout
    failures = c.failures()
    counts = c.counts()
    disk, raw = counts["disk_bytes"], counts["feature_bytes_uncompressed"]
    if plot_path:
        from .plots import cache_overview
        cache_overview(c, plot_path)
    if as_json:
        click.echo(json.dumps({"metadata": m, "counts": counts, "failures": failures if show_failures else None,
                               "plot": plot_path}, indent=2, default=str))
        return
    model = m["model"]
    click.echo(f"cache      {cache}  (schema {m['schema_version']}, cachefeat {m.get('tool_version')})")
    click.echo(f"model      {model['name']}  pretrained={model['pretrained']}"
               + (f" seed={model['init_seed']}" if model.get("init_seed") is not None else "")
               + f"  quick_gelu={model['quick_gelu']}  weights sha256 {model['weights_sha256'][:16]}...")
    click.echo(f"features   layers {lay.layers}  tokens {lay.tokens}  width {lay.width}  embed {lay.embed_dim}  "
               f"dtype {lay.dtype}  codec {m.get('codec')}  computed in {m.get('compute_precision')}")
    s = m["sampling"]
    if lay.windowed:
        import numpy as np
        hours = float(np.nansum(c.read("videos/duration"))) / 3600
        how = f"fps:{s['fps']:g}  windows of {lay.frames} frames, {s['window_stride']} apart  {hours:.2f} h of video"
    else:
        how = (f"{s['method']}{':' + str(s['stride']) if s.get('stride') else ''}  frames {lay.frames}  "
               f"views {lay.views}")
    click.echo(f"sampling   {how}  preprocessing {m['preprocessing']['size'][0]}px "
               f"{m['preprocessing']['interpolation']} {m['preprocessing']['resize_mode']}")
    aug = c.augment
    held = ["embed", f"cls x{len(lay.layers)} layers"]
    if lay.tokens.kind != "cls":
        held.append(f"{lay.tokens} tokens x{len(lay.layers)} layers")
    if lay.pixels:
        held.append(f"pixels {lay.pixels.size}px x{lay.pixels.factor} frames")
    if c.text:
        held.append(f"text embeddings of {len(c.classes)} classes (template {c.text['template']!r})")
    held.append(f"{aug['views']} augmented views (scale {aug['scale']}, flip {aug['flip']}"
                + (f" with label pairs {aug['flip_pairs']}" if aug.get("flip_pairs") else "")
                + f", colour jitter {aug['color_jitter']}"
                + (f", RandAugment {aug['randaugment']}" if aug.get("randaugment") else "")
                + f", seed {aug['seed']})" if aug else "windows with timestamps" if lay.windowed
                else f"{lay.views} test views")
    if lay.dtype == "int8":
        held.append("int8, dequantized on read")
    click.echo(f"holds      {'; '.join(held)}")
    click.echo(f"classes    {len(c.classes)}" + (f" ({', '.join(c.classes[:6])}{', ...' if len(c.classes) > 6 else ''})"
                                                 if c.classes else ""))
    state = ("complete" if counts["shards_done"] == counts["shards"]
             else f"INCOMPLETE: {counts['shards_done']} of {counts['shards']} shards done (resume with extract)")
    holder = c.being_written_by()
    if holder:
        state += (f"; being written by {holder.get('command', 'extract')}, pid {holder.get('pid', '?')} on "
                  f"{holder.get('host', '?')} since {holder.get('since', '?')}")
    click.echo(f"progress   {state}")
    per_video = "windows per video by duration" if lay.windowed else f"x {lay.views.count} views"
    click.echo(f"clips      {counts['valid_clips']} valid of {c.num_clips} ({c.num_videos} videos {per_video}); "
               f"{len(failures)} videos failed")
    click.echo(f"size       {human_bytes(disk)} on disk, {human_bytes(raw)} uncompressed features"
               + (f", ratio {raw / disk:.3f}" if disk else "")
               + (f", {human_bytes(counts['bytes_per_frame_on_disk'])} per frame"
                  if counts["bytes_per_frame_on_disk"] else ""))
    per = lay.bytes_per_clip()
    if c.text:
        per["text"] = 0  # per cache, not per frame: shown below
    parts = ", ".join(f"{k} {human_bytes(v / lay.frames)}" for k, v in per.items()
                      if not k.startswith("tokens/") and k != "text")
    tok = sum(v for k, v in per.items() if k.startswith("tokens/"))
    click.echo(f"per frame  {parts}" + (f", tokens {human_bytes(tok / lay.frames)}" if tok else "") + " (uncompressed)"
               + (f"; text embeddings {human_bytes(c.root['text/embed'].nbytes)} per cache" if c.text else ""))
    if plot_path:
        click.echo(f"plot       {plot_path}")
    if failures:
        shown = failures if show_failures else failures[:5]
        click.echo("failures" + ("" if show_failures or len(failures) <= 5
                                 else f" (first 5; --failures for all {len(failures)})"))
        for f in shown:
            click.echo(f"  [{f['stage']}] {f['path']}: {f['error']}")


# ------------------------------------------------------------------------------------------- models
@cli.command()
@click.option("--all", "show_all", is_flag=True, help="Also list open_clip models without pretrained tags.")
@click.option("--timm", "timm_pattern", metavar="PATTERN",
              help="List the timm ViTs whose name matches PATTERN (e.g. '*dinov2*'), with their pretrained tags.")
def models(show_all, timm_pattern):
    """List the backbone families and what each supports, then the open_clip models of each family with their
    pretrained tags (timm ViTs with --timm PATTERN; any of them works as --model timm:NAME).

    \b
    Examples:
      cachefeat models
      cachefeat models --timm '*reg4_dinov2*'
    """
    from .extract.backbone import FAMILIES, config_family, timm_models
    from .fmt import table
    if timm_pattern:
        rows = [[f"timm:{arch}", ", ".join(tags) or "-"] for arch, tags in timm_models(timm_pattern)]
        click.echo(table(rows, ["--model", "--pretrained tags"]) if rows else f"no timm ViT matches {timm_pattern!r}")
        return
    rows = [[f.name, f.example, f.cls, f.prefix, "yes" if f.text else "no", f.tca, f.extras] for f in FAMILIES]
    click.echo(table(rows, ["family", "recommended (--model ... --pretrained ...)", "cls holds", "prefix tokens",
                            "text tower", "evl tca", "extras"]))
    click.echo("text tower: class-name text embeddings, zeroshot and dist head=text; temporal, evl, madapter, dist "
               "and probe work on every family (docs/backbones.md)\n"
               "extras: pip install 'cachefeat[EXTRA]' (make install EXTRAS=EXTRA); without it, extract with "
               "--no-text\n")
    click.echo(f"{'open_clip model':30s} {'family':24s} pretrained tags")
    for name, family, tags in config_family(show_all):
        click.echo(f"{name:30s} {family:24s} {', '.join(tags) or '-'}")
    click.echo("timm ViTs: --model timm:NAME (cachefeat models --timm PATTERN lists names and tags)")


# ------------------------------------------------------------------------------------------- run
@cli.command()
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.option("--workdir", type=click.Path(file_okay=False),
              help="Where the recipe's relative paths live (default: the recipe's `workdir`, else its file name).")
@click.option("--force", is_flag=True, help="Run every stage again, even those recorded as done.")
@click.option("--only", multiple=True, help="Run only this stage (repeatable).")
@click.option("--set", "set_vars", multiple=True, metavar="NAME=VALUE",
              help="Set a variable of the recipe (its `vars:`), e.g. --set model=ViT-L-14 --set frames=16 "
                   "(repeatable).")
def run(recipe, workdir, force, only, set_vars):
    """Run a recipe (pipelines/*.yaml): its stages in order, skipping those already done.

    Re-running after a crash continues: finished stages are skipped and the interrupted one resumes.
    A stage whose settings changed (e.g. another --set) runs again.

    \b
    Examples:
      cachefeat run pipelines/demo.yaml --workdir demo
      cachefeat run pipelines/k400.yaml --set model=ViT-L-14 --set frames=16
    """
    from .recipes import parse_set, run_recipe
    report = run_recipe(cli, recipe, workdir, force, only, overrides=parse_set(set_vars))  # RecipeError: exit 2
    ran = [r for r in report if not r["skipped"]]
    click.echo(f"recipe {recipe}: {len(ran)} stages run, {len(report) - len(ran)} skipped")


# ------------------------------------------------------------------------------------------- train
_TD = TrainConfig.defaults()    # every train option's default comes from TrainConfig


def _train_views(ctx, param, value):
    from .train.config import _train_views_ok
    if not _train_views_ok(value):
        raise click.BadParameter(f"{value!r}: expected one, all, cycle or first:K")
    return str(value).strip().lower()


class _Epochs(click.ParamType):
    """A positive number of epochs, or `auto` (0 in TrainConfig: planned for the data set's size)."""
    name = "INTEGER|auto"

    def convert(self, value, param, ctx):
        if isinstance(value, int) and not isinstance(value, bool):
            if value == 0:      # TrainConfig's default: auto
                return 0
            n = value
        elif str(value).strip().lower() == "auto":
            return 0
        else:
            try:
                n = int(str(value))
            except ValueError:
                self.fail(f"{value!r} is not a number of epochs or auto", param, ctx)
        if n < 1:
            self.fail(f"{value} is not at least 1 (or auto)", param, ctx)
        return n


_EPOCHS = _Epochs()


def _log_destinations(ctx, param, value):
    from .train.tracking import TrackingError, parse_log
    try:
        return ",".join(parse_log(value)) or "none"
    except TrackingError:
        raise click.BadParameter(f"{value!r}: expected none, tensorboard, wandb or tensorboard,wandb") from None


_LOG_HELP = ("Also log every epoch (losses, top-1/top-5, learning rate, step time, clips/s, reading MB/s) and the "
             "run's config, cache fingerprint and backbone to TensorBoard, Weights & Biases (WANDB_MODE=offline: no "
             "account), or both (tensorboard,wandb); optional extras: pip install 'cachefeat[tensorboard]' / "
             "'cachefeat[wandb]'.")


def _parse_adapter_opts(items) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE", param_hint="--adapter-opt")
        out[key.strip()] = value.strip()
    return out


def _local_cache_size(ctx, param, value):
    if value is None:
        return None
    from .fmt import parse_bytes
    try:
        return parse_bytes(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _local_cache_options(f):
    """train's, eval's and ablate's --local-cache DIR and --local-cache-size SIZE (store.local_copy)."""
    f = click.option("--local-cache-size", metavar="SIZE", callback=_local_cache_size,
                     help="The most bytes --local-cache may hold, such as 50G (K, M, G, T: powers of 1024); "
                          "default: 80% of its file system's free space at the start, plus what it holds.")(f)
    return click.option("--local-cache", metavar="DIR", type=click.Path(file_okay=False),
                        help="Keep the shard objects read from an s3:// cache in DIR, so that later epochs and "
                             "runs read them from local disk (ignored for a cache in a folder). Ray workers and "
                             "trials on other nodes keep their own copy at the same path.")(f)


def _use_local_copy(folder, max_bytes, caches) -> str | None:
    """The local copy of fetched shards (store.local_copy) set for this command's s3:// caches, and unset when
    the command ends: the line that says where it is; None when none was asked for or no cache is in a bucket."""
    if max_bytes is not None and not folder:
        raise click.UsageError("--local-cache-size needs --local-cache DIR")
    if not folder or not any(str(c).startswith("s3://") for c in caches if c):
        return None
    from .store import local_copy
    copy = local_copy.use(folder, max_bytes)
    click.get_current_context().call_on_close(local_copy.off)
    return copy.describe()


@cli.command()
@click.option("--cache", required=True, type=_PathOrURL(file_okay=False),
              help="The training cache (a store written by cachefeat extract, or the s3://bucket/prefix URL "
                   "of one uploaded with cachefeat push).")
@click.option("--val-cache", type=_PathOrURL(file_okay=False),
              help="A held-out cache evaluated after every epoch (same backbone, preprocessing and class list).")
@_local_cache_options
@click.option("--adapter", "-a", default=_TD["adapter"], show_default=True,
              help="Adapter to train: probe, temporal, evl, dist, madapter (`cachefeat adapters` lists them).")
@click.option("--adapter-opt", "adapter_opt", multiple=True, metavar="KEY=VALUE",
              help="An adapter option, repeatable (e.g. --adapter-opt layers=4); `cachefeat adapters` lists them.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="YAML or JSON file of settings: keys named like these options (epochs, lr, ...) plus "
                   "`adapter_opts: {key: value}`. Options given on the command line win over the file.")
@click.option("--epochs", default=_TD["epochs"], show_default="auto", type=_EPOCHS,
              help="Passes over the training videos, or auto: at least 30 and enough for --min-steps optimiser "
                   "steps (a small data set gets more epochs; Kinetics-size sets get 30).")
@click.option("--min-steps", default=_TD["min_steps"], show_default=True, type=click.IntRange(0),
              help="With --epochs auto: the fewest optimiser steps a run takes.")
@click.option("--batch-size", "-b", default=_TD["batch_size"], show_default=True, type=click.IntRange(1),
              help="Clips per step.")
@click.option("--lr", default=_TD["lr"], show_default=True, type=click.FloatRange(0, min_open=True),
              help="Peak learning rate of AdamW (after warm-up; cosine decay to --min-lr).")
@click.option("--weight-decay", default=_TD["weight_decay"], show_default=True, type=click.FloatRange(0),
              help="AdamW weight decay (on the parameters --weight-decay-on names).")
@click.option("--weight-decay-on", default=_TD["weight_decay_on"], show_default=True,
              type=click.Choice(["matrices", "all"]),
              help="matrices: decay weight matrices, not biases, norms, queries or position embeddings (DiST, timm); "
                   "all: every parameter (EVL).")
@click.option("--warmup-epochs", default=_TD["warmup_epochs"], show_default=True, type=click.FloatRange(0),
              help="Epochs of linear learning-rate warm-up.")
@click.option("--min-lr", default=_TD["min_lr"], show_default=True, type=click.FloatRange(0),
              help="Learning rate at the end of the cosine decay.")
@click.option("--label-smoothing", default=_TD["label_smoothing"], show_default=True,
              type=click.FloatRange(0, 1, max_open=True), help="Label smoothing of the cross-entropy targets.")
@click.option("--mixup", default=_TD["mixup"], show_default=True, type=click.FloatRange(0),
              help="Mixup of cached features with Beta(a, a) weights; 0 = off (DiST uses 0.8).")
@click.option("--cutmix", default=_TD["cutmix"], show_default=True, type=click.FloatRange(0),
              help="CutMix along time: a span of frames from another clip, length ~ Beta(a, a); 0 = off. With "
                   "--mixup too, each step picks one of the two.")
@click.option("--grad-clip", default=_TD["grad_clip"], show_default=True, type=click.FloatRange(0),
              help="Clip the gradient norm to this; 0 = no clipping.")
@click.option("--train-views", default=_TD["train_views"], show_default=True, callback=_train_views,
              help="one: each epoch draws one of each video's views (the cache's augmented views, or its test "
                   "views as jitter); all: every view is a training sample; first:K: one of each video's first K "
                   "views (a K-view cache, from a larger one); cycle: view epoch mod V, every view used once "
                   "before any repeats (with as many views as epochs: online augmentation).")
@click.option("--view-average", default=_TD["view_average"], show_default=True, type=click.Choice(["logit", "prob"]),
              help="Validation: average the logits of a video's views, or their softmax probabilities (EVL's test "
                   "protocol); eval uses the same unless told otherwise.")
@click.option("--seed", default=_TD["seed"], show_default=True,
              help="Seed of the adapter's initial weights, data order, dropout and mixing.")
@click.option("--device", default=_TD["device"], show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--precision", default=_TD["precision"], show_default=True,
              type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
              help="Adapter compute precision (auto: bf16 autocast on GPUs that have it, else fp16 with loss "
                   "scaling; fp32 on CPU).")
@click.option("--in-memory", default=_TD["in_memory"], show_default=True, type=click.Choice(["auto", "yes", "no"]),
              help="Hold the arrays the adapter reads in RAM (auto: when they take under half the free memory), "
                   "or stream them from disk, whole shards at a time.")
@click.option("--read-workers", default=_TD["read_workers"], show_default=True, type=click.IntRange(0),
              help="Reader processes when streaming (0 = read in this process); per worker with --workers.")
@click.option("--threads", default=_TD["threads"], show_default=True, type=click.IntRange(0),
              help="CPU threads for the adapter (0 = torch's default; 1 is often fastest for small adapters on a "
                   "busy machine).")
@click.option("--workers", "-w", "ray_workers", default=1, show_default=True, type=click.IntRange(1),
              help="Data-parallel workers. Above 1, Ray Train runs N workers (one GPU each with nccl, or one CPU "
                   "slot each with gloo), each reading its slice of every batch of --batch-size clips (the global "
                   "batch: same steps and schedule as one process), gradients averaged (DDP); worker 0 validates "
                   "and writes --out in the single-process format.")
@click.option("--address", metavar="auto|HOST:PORT",
              help="Run the workers on a running Ray cluster (`ray start --head` on one node, `ray start --address "
                   "HEAD:6379` on the others; auto = the cluster of this node) instead of starting Ray here. --out "
                   "and caches in folders must then be on storage every node sees at the same path (caches in a "
                   "bucket need not).")
@click.option("--log", default=_TD["log"], show_default=True, callback=_log_destinations,
              help=_LOG_HELP + " Into --out: tensorboard/ (event files), wandb/ (the W&B run).")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False),
              help="Run folder (e.g. runs/NAME): checkpoint/, metrics.jsonl, summary.json, curves.png.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint (same settings).")
@click.option("--overwrite", is_flag=True,
              help="Replace the run in --out instead of refusing (only once every other check has passed).")
@click.option("--allow-incomplete", is_flag=True,
              help="Train (and validate) on caches whose extraction has not finished, or is still running: their "
                   "finished shards only. The summary counts the videos left out.")
@click.option("--quiet", "-q", is_flag=True, help="Only the final line.")
@click.pass_context
def train(ctx, cache, val_cache, local_cache, local_cache_size, adapter, adapter_opt, config_file, ray_workers,
          address, out, resume, overwrite, allow_incomplete, quiet, **settings):
    """Train an adapter on a cache: AdamW, warm-up + cosine schedule, label smoothing, optional feature-space
    mixup/cutmix, mixed precision on GPU. The backbone is never run (except to copy frozen block weights
    for evl's temporal cross-attention).

    Refuses, in one line, a cache that cannot provide what the adapter needs, and a val cache made with
    another backbone, preprocessing or class list. After every epoch the checkpoint is written atomically,
    so an interrupted run continues with --resume.

    \b
    Examples:
      cachefeat train --cache k400_train.zarr --val-cache k400_val.zarr --adapter evl --epochs 30 --out runs/evl
      cachefeat train ... --workers 8                   # 8 GPUs of this node, data-parallel (Ray Train)
      cachefeat train ... --workers 16 --address auto   # on the Ray cluster this node belongs to
    """
    from dataclasses import replace

    from click.core import ParameterSource

    from .train import TrainDiverged, cpu_threads, open_run, open_run_folder, read_config_file
    from .train import train as run_training
    from .train.coverage import describe

    values = {"adapter": adapter, **settings}
    opts = {}
    if config_file:
        file = read_config_file(config_file)
        opts.update({str(k): v for k, v in (file.pop("adapter_opts", None) or {}).items()})
        for k, v in file.items():
            if ctx.get_parameter_source(k) == ParameterSource.DEFAULT:
                values[k] = v
    opts.update(_parse_adapter_opts(adapter_opt))
    cfg = TrainConfig(adapter_opts=opts, **values)
    from .train.tracking import check as check_log
    check_log(cfg.log)            # a missing extra: one line, before anything is written
    folder = open_run_folder(out, cfg, resume=resume, overwrite=overwrite)   # checks only: deletes nothing yet
    distributed = ray_workers > 1 or address
    copy = _use_local_copy(local_cache, local_cache_size, (cache, val_cache))
    if copy and not quiet:
        click.echo(copy)
    # the checks of a single run, here in the driver; with --workers, nothing is loaded into RAM here
    # (the device is checked here too, unless Ray's workers pick their own)
    run = open_run(replace(cfg, in_memory="no") if distributed else cfg, cache, val_cache, allow_incomplete,
                   check_device=not distributed)
    folder.check_cache(run.train_cache)
    if folder.finished:
        click.echo(f"{out}: already trained for {folder.resume_from['epoch']} epochs; nothing to do")
        return
    if not distributed:
        folder.start()     # every check passed: an earlier run being replaced goes now
    log = (lambda s: None) if quiet else click.echo
    src = run.train_source
    n_train = len(src.rows(0, train=True))
    log(f"adapter {cfg.adapter}: {run.model.num_trainable():,} trainable parameters; {run.model.summary}")
    if distributed:
        where = f"read by {ray_workers} data-parallel workers, each its slice of every batch"
    else:
        streams = getattr(src, "workers", cfg.read_workers)      # (0 for a cache in a bucket)
        where = ("held in RAM" if src.dataset.in_memory else
                 f"streamed by {streams} reader processes" if streams else "streamed by this process")
    log(f"reads {run.needs.describe()}; from {cache}: {n_train} training clips per epoch, "
        f"{human_bytes(src.dataset.nbytes())} {where}" + (f"; validates on {val_cache}" if val_cache else ""))
    for role, cov in run.coverage.items():
        log(f"{role} cache: {describe(cov, what='used')}")
    if cfg.epochs == 0:
        steps = src.steps(0, train=True)
        log(f"epochs auto: {run.epochs} epochs of {steps} steps ({run.epochs * steps} steps; at least 30 epochs and "
            f"{cfg.min_steps} steps)")
    try:
        if distributed:
            # the Ray cluster is checked too before the earlier run goes
            final = _train_on_ray(cfg, cache, val_cache, out, folder.resume_from is not None, ray_workers, address,
                                  log, allow_incomplete, folder.start)["final"]
        else:
            with cpu_threads(cfg.threads):
                result = run_training(run, folder.path, resume=folder.resume_from, log=log)
            final = result.history[-1] if result.history else {}
    except TrainDiverged as e:
        raise click.ClickException(str(e)) from None
    best = " checkpoint_best/," if (Path(out) / "checkpoint_best").is_dir() else ""
    msg = f"wrote {out}: checkpoint/,{best} metrics.jsonl, summary.json, curves.png"
    if final.get("val_top1") is not None:
        msg += f"; val top-1 {100 * final['val_top1']:.1f}%, top-5 {100 * final['val_top5']:.1f}%"
    click.echo(msg)


def _train_on_ray(cfg, cache, val_cache, out, resume, workers, address, log, allow_incomplete, before_start) -> dict:
    from .ray_runtime import ClusterError, WorkerError
    from .train.distributed import train_distributed
    try:
        return train_distributed(cfg, cache, val_cache, out, resume, workers, address, log, allow_incomplete,
                                 before_start)
    except ClusterError as e:
        raise click.UsageError(str(e)) from None
    except WorkerError as e:
        raise click.ClickException(f"{e} (finished epochs are kept: the same command with --resume "
                                   f"continues)") from None


# ------------------------------------------------------------------------------------------- ablate
@cli.command()
@click.argument("spec", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "-o", type=click.Path(file_okay=False),
              help="Folder for trials/<name>/ (one training run folder per trial), results.csv, results.md, "
                   "results.png and best/ (default: ablations/<spec name>).")
@click.option("--cache", "train_cache", type=_PathOrURL(file_okay=False),
              help="Use this training cache (a folder or an s3://bucket/prefix URL) instead of the spec's "
                   "train-cache.")
@click.option("--val-cache", type=_PathOrURL(file_okay=False),
              help="Use this val cache instead of the spec's val-cache.")
@_local_cache_options
@click.option("--gpus-per-trial", type=click.FloatRange(0), default=None,
              help="GPUs each trial reserves; fractions share a GPU (0.25: four trials per GPU). Default: 0.25 when "
                   "the Ray cluster has GPUs, else 0 (CPU trials).")
@click.option("--cpus-per-trial", type=click.FloatRange(0, min_open=True), default=1.0, show_default=True,
              help="CPU slots each trial reserves (also its torch threads, unless the spec sets threads).")
@click.option("--max-concurrent", type=click.IntRange(0), default=0, show_default=True,
              help="Trials running at once, at most (0 = as many as the per-trial resources fit on the cluster).")
@click.option("--asha", is_flag=True,
              help="Stop hopeless trials early: ASHA on val top-1 per epoch (grace period a quarter of the epochs, "
                   "half of the trials stopped at each rung).")
@click.option("--num-samples", type=click.IntRange(1), default=None,
              help="Samples of the spec's random part, each with the whole grid (default: the spec's num-samples, "
                   "else 1). Trials = grid points x samples.")
@click.option("--address", metavar="auto|HOST:PORT",
              help="Run the trials on a running Ray cluster (`ray start --head` on one node, `ray start --address "
                   "HEAD:6379` on the others; auto = the cluster of this node) instead of starting Ray here. --out "
                   "and caches in folders must then be on storage every node sees at the same path (caches in a "
                   "bucket need not).")
@click.option("--overwrite", is_flag=True, help="Replace the results of an earlier ablation in --out.")
@click.option("--allow-incomplete", is_flag=True,
              help="Train and validate on caches whose extraction has not finished (or is still running): their "
                   "finished shards only.")
@click.option("--log", default="none", show_default=True, callback=_log_destinations,
              help=_LOG_HELP + " Into --out: tensorboard/<trial>/ per trial plus the HParams experiment (every "
                   "trial's settings and final metrics, the best marked); wandb/ (one run per trial, grouped by "
                   "the ablation's name).")
@click.option("--check", is_flag=True, help="Only check the spec and its caches, list the trials' grid, and exit.")
def ablate(spec, out, train_cache, val_cache, local_cache, local_cache_size, gpus_per_trial, cpus_per_trial,
           max_concurrent, asha, num_samples, address, overwrite, allow_incomplete, check, log):
    """Train many adapter configurations side by side on the same caches (Ray Tune), and rank them.

    SPEC is a YAML file: the caches, the training settings every trial shares, per-adapter settings, and the
    search space: a grid (every combination is a trial) and/or random draws (--num-samples). See
    pipelines/ablate-*.yaml. Each trial is a normal `cachefeat train` run into OUT/trials/<name>; val top-1
    is reported after every epoch (what --asha uses). Prints one line per finished trial; writes
    results.csv and results.md (config, trainable parameters, val top-1/top-5, time, peak memory, status;
    sorted by val top-1), results.png, and best/ (the best trial's run folder: `cachefeat eval --checkpoint
    OUT/best`).

    \b
    Examples:
      cachefeat ablate pipelines/ablate-demo.yaml --out ablations/demo
      cachefeat ablate pipelines/ablate-adapters.yaml --gpus-per-trial 0.25        # 4 trials per GPU
      cachefeat ablate pipelines/ablate-depth-width.yaml --asha --address auto     # on a Ray cluster
    """
    import dataclasses

    from .train.ablate import check_caches, load_spec, prepare_out_dir, run_ablation
    s = load_spec(spec)
    if train_cache:
        s = dataclasses.replace(s, train_cache=train_cache)
    if val_cache:
        s = dataclasses.replace(s, val_cache=val_cache)
    copy = _use_local_copy(local_cache, local_cache_size, (s.train_cache, s.val_cache))
    if copy and not check:
        click.echo(copy)
    check_caches(s, allow_incomplete)
    from .train.tracking import check as check_log
    check_log(log)
    n = num_samples or s.num_samples
    if check:
        click.echo(f"{spec}: ok; {s.grid_size() * n} trials of adapters {', '.join(s.adapter_names())} "
                   f"on {s.train_cache}")
        return
    out_dir = prepare_out_dir(out or Path("ablations") / Path(spec).stem, spec, overwrite)
    from .ray_runtime import ClusterError, WorkerError
    try:
        rows = run_ablation(s, str(out_dir), gpus_per_trial, cpus_per_trial, max_concurrent, asha, num_samples,
                            address, log=click.echo, allow_incomplete=allow_incomplete, track=log)
    except ClusterError as e:
        raise click.UsageError(str(e)) from None
    except WorkerError as e:
        raise click.ClickException(str(e)) from None
    failed = [r for r in rows if r.status.startswith("error")]
    best = next((r for r in rows if r.val_top1 is not None), None)
    click.echo(f"wrote {out_dir}: results.csv, results.md, results.png"
               + (f", best/ ({best.name}: val top-1 {100 * best.val_top1:.1f}%)" if best else ""))
    if failed:
        raise click.ClickException(f"{len(failed)} of {len(rows)} trials failed "
                                   f"(status column of {out_dir}/results.md; "
                                   f"their logs: {out_dir}/trials/<name>/train.log)")


# ------------------------------------------------------------------------------------------- eval
@cli.command("eval")
@click.option("--checkpoint", "-c", required=True, type=click.Path(exists=True),
              help="A run folder written by cachefeat train (its last checkpoint), or a checkpoint folder such as "
                   "RUN/checkpoint_best.")
@click.option("--cache", required=True, type=_PathOrURL(file_okay=False),
              help="The cache to evaluate on (same backbone, preprocessing and class list as the training cache; "
                   "a folder or an s3://bucket/prefix URL).")
@_local_cache_options
@click.option("--out", type=click.Path(file_okay=False),
              help="Folder for metrics.json, confusion.npz, logits.npz, per_class.csv and the figures "
                   "(default: RUN/eval-<cache name>).")
@click.option("--batch-size", "-b", default=64, show_default=True, type=click.IntRange(1), help="Clips per forward.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--precision", default="auto", show_default=True, type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
              help="Adapter compute precision (auto: bf16/fp16 autocast on GPU, fp32 on CPU).")
@click.option("--in-memory", default="auto", show_default=True, type=click.Choice(["auto", "yes", "no"]),
              help="Hold the arrays in RAM, or stream them whole shards at a time.")
@click.option("--read-workers", "workers", default=2, show_default=True, type=click.IntRange(0),
              help="Reader processes when streaming (0 = read in this process).")
@click.option("--threads", default=0, show_default=True, type=click.IntRange(0),
              help="CPU threads (0 = torch's default).")
@click.option("--allow-incomplete", is_flag=True,
              help="Evaluate on a cache whose extraction has not finished (or is still running): its finished "
                   "shards only. The report counts the videos left out.")
@click.option("--view-average", type=click.Choice(["logit", "prob"]),
              help="Average a video's views by their logits, or by their softmax probabilities (EVL's protocol). "
                   "Default: the run's --view-average (logit for runs that predate it).")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON (top1, top5 as fractions, and more).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def eval_cmd(checkpoint, cache, local_cache, local_cache_size, out, batch_size, device, precision, in_memory, workers,
             threads, allow_incomplete, view_average, as_json, quiet):
    """Evaluate a trained adapter on a cache with the multi-view protocol: the logits (or, --view-average
    prob, the probabilities) of all views of a video are averaged, then top-1 and top-5 are counted per
    video. Also per-class accuracy, the most confused class pairs, the whole confusion matrix (confusion.npz)
    and every video's logits (logits.npz).

    A cache whose extraction is unfinished, or still running, is refused unless --allow-incomplete.

    Example: cachefeat eval --checkpoint runs/evl --cache k400_val.zarr --json
    """
    from .store import open_cache
    from .train import cpu_threads, load_adapter
    from .train.coverage import describe
    from .train.evaluate import CELL_REPORT_MAX_CLASSES, metrics_json, report_dir, write_report

    adapter = load_adapter(checkpoint)
    out_dir = report_dir(checkpoint, cache, out)
    copy = _use_local_copy(local_cache, local_cache_size, (cache,))
    if copy and not quiet:
        click.echo(copy, err=True)             # (stdout: the figures, --json)
    c = open_cache(cache)
    with cpu_threads(threads), _progress_bar("eval", "clip", quiet or as_json, int(c.valid().sum())) as bar:
        result = adapter.evaluate(c, batch_size, device, precision, in_memory, workers, allow_incomplete,
                                  keep_logits=True, progress=bar.update, view_average=view_average)
    ck, classes = adapter.checkpoint, adapter.classes
    files = write_report(out_dir, result, classes)
    if as_json:
        click.echo(json.dumps({**metrics_json(result), "files": files}, indent=2, allow_nan=False))
        return
    cov = result["coverage"]
    click.echo(f"{ck['adapter']} ({ck['epoch']} epochs) on {cache}: top-1 {_pct(result['top1'])}  "
               f"top-5 {_pct(result['top5'])}  ({describe({**cov, 'usable': cov['evaluated']})}; "
               f"{result['clips']} clips"
               + (f", {'probabilities' if result['view_average'] == 'prob' else 'logits'} of {result['views']} "
                  f"views averaged per video)" if result["views"] > 1 else ")")
               + (f"; time-reversal pairs told apart {100 * result['reversal_accuracy']:.1f}%"
                  if "reversal_accuracy" in result else ""))
    per_class = result.get("per_class", {})
    if len(per_class) <= CELL_REPORT_MAX_CLASSES:
        rows = [[name, _pct(acc)] for name, acc in per_class.items()]
        click.echo(table(rows, ["class", "accuracy"]))
    else:
        scored = sorted((acc, name) for name, acc in per_class.items() if acc is not None)
        click.echo(f"per-class accuracy over {len(scored)} classes with videos (of {len(per_class)}); lowest: "
                   + ", ".join(f"{name} {_pct(acc)}" for acc, name in scored[:8]))
        if result.get("most_confused"):
            pairs = result["most_confused"][:8]
            click.echo("most confused (true -> predicted, videos): "
                       + "; ".join(f"{c['true']} -> {c['predicted']} {c['videos']}" for c in pairs))
    click.echo(f"wrote {out_dir}: {', '.join(files.values())}")


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _progress_bar(desc: str, unit: str, off: bool, total: int | None = None):
    """A tqdm bar on stderr: off when asked, and when stderr is not a terminal."""
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=unit, disable=True if off else None, leave=False, dynamic_ncols=True)


# ------------------------------------------------------------------------------------------- predict
@cli.command()
@click.argument("videos", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--checkpoint", "-c", required=True, type=click.Path(exists=True),
              help="A run folder written by cachefeat train, or one of its checkpoint folders.")
@click.option("--top", default=5, show_default=True, type=click.IntRange(1), help="Classes to show per video.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N (backbone and adapter).")
@click.option("--precision", default="auto", show_default=True, type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
              help="Adapter compute precision (the backbone uses its own: fp16 on GPU, fp32 on CPU).")
@click.option("--threads", default=0, show_default=True, type=click.IntRange(0),
              help="CPU threads (0 = torch's default).")
@click.option("--decode-workers", type=click.IntRange(0), default=1, show_default=True,
              help="Decode processes, as in extract (0 = decode in this process, with no timeout).")
@click.option("--decode-timeout", default=60.0, show_default=True, type=click.FloatRange(0.1),
              help="Seconds one video may take to decode before its decoder is killed and the video reported as "
                   "failed (a hung decoder, a FIFO).")
@click.option("--json", "as_json", is_flag=True, help="Print the predictions as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def predict(videos, checkpoint, top, device, precision, threads, decode_workers, decode_timeout, as_json, quiet):
    """Classify new videos end to end: the backbone, frame sampling, views and preprocessing recorded with
    the training cache (the backbone is rebuilt and its weights hash checked), then the trained adapter;
    the logits of the views are averaged. Prints the top classes with their probabilities.

    Example: cachefeat predict --checkpoint runs/evl clip1.mp4 clip2.mp4
    """
    from .train import cpu_threads, load_checkpoint
    from .train.predict import predict as run_predict

    ck = load_checkpoint(checkpoint)
    with cpu_threads(threads), _progress_bar("predict", "video", quiet or as_json, len(videos)) as bar:
        results = run_predict(ck, list(videos), device=device, precision=precision, top=top,
                              decode_workers=decode_workers, decode_timeout=decode_timeout, progress=bar.update)
    if as_json:
        click.echo(json.dumps(results, indent=2))
    else:
        for r in results:
            click.echo(r["video"])
            if "error" in r:
                click.echo(f"  failed: {r['error']}")
                continue
            for i, t in enumerate(r["top"], 1):
                click.echo(f"  {i}. {t['class']:<32s} {t['probability']:.3f}")
    failed = [r for r in results if "error" in r]
    if failed:
        raise click.ClickException(f"{len(failed)} of {len(results)} videos could not be read")


# ------------------------------------------------------------------------------------------- compare
@cli.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
def compare(runs, as_json):
    """Compare training runs side by side: adapter, trainable parameters, training time, and top-1/top-5
    of each run's latest `cachefeat eval` (else its last validation).

    Example: cachefeat compare runs/probe runs/temporal runs/evl
    """
    from .train import compare_runs
    rows = compare_runs(runs)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    has_rev = any(r["reversal_accuracy"] is not None for r in rows)
    header = (["run", "adapter", "params", "epochs", "train s", "top-1", "top-5"]
              + (["reversal pairs"] if has_rev else []) + ["from"])
    body = [[r["run"], r["adapter"], f"{r['trainable_params']:,}", r["epochs"], f"{r['train_seconds']:.1f}",
             pct(r["top1"]), pct(r["top5"])] + ([pct(r["reversal_accuracy"])] if has_rev else []) + [r["measured_by"]]
            for r in rows]
    click.echo(table(body, header))
    if has_rev:
        click.echo("reversal pairs: how often the true class outscores its time-reversed partner "
                   "(50% = blind to frame order)")


# ------------------------------------------------------------------------------------------- checkpoint
@cli.group("checkpoint")
def checkpoint_group():
    """Trained adapters' checkpoints: convert those of cachefeat before 2026-12-06 (docs/security.md)."""


@checkpoint_group.command("migrate")
@click.argument("old", type=click.Path(exists=True))
@click.argument("new", type=click.Path(file_okay=False))
@click.option("--trust", is_flag=True,
              help="Unpickle OLD in full. This runs any code the file holds: only for a file you made yourself. "
                   "Without it, migrate reads only the data types of the old format, and refuses anything else.")
def checkpoint_migrate(old, new, trust):
    """Convert OLD, a checkpoint file of the old pickle format (RUN/checkpoint.pt; or a run folder: its
    checkpoint.pt and checkpoint_best.pt), into the run folder NEW in today's format, which holds data only
    (NEW/checkpoint). Every file is checked before anything is written; a checkpoint in NEW is never replaced.

    Example: cachefeat checkpoint migrate runs/old/checkpoint.pt runs/old-migrated
    """
    from .train.migrate import migrate

    for src, dst, ck in migrate(old, new, trust, warn=lambda line: click.echo(line, err=True)):
        click.echo(f"migrated {src} -> {dst} ({ck['adapter']}, epoch {ck['epoch']})")


# ------------------------------------------------------------------------------------------- adapters
@cli.command("adapters")
@click.option("--json", "as_json", is_flag=True, help="Print names, descriptions and options as JSON.")
def adapters_cmd(as_json):
    """List the adapters `cachefeat train --adapter` accepts, what each reads from a cache, and its options
    (set with --adapter-opt KEY=VALUE)."""
    import dataclasses

    from . import adapters as reg
    out = []
    for name in reg.list_adapters():
        cls = reg.get(name)
        opts = {f.name: getattr(cls.Config(), f.name) for f in dataclasses.fields(cls.Config)}
        out.append({"name": name, "summary": cls.summary, "reads": cls.reads, "options": opts})
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    for a in out:
        click.echo(f"{a['name']:<9s} {a['summary']}")
        click.echo(f"{'':9s} reads: {a['reads']}")
        click.echo(f"{'':9s} options: " + ", ".join(f"{k}={v}" for k, v in a["options"].items()))


# ------------------------------------------------------------------------------------------- zeroshot
@cli.command()
@click.option("--cache", "cache_path", required=True, type=click.Path(exists=True),
              help="An eval cache with class-name text embeddings (made by extract with a CLIP that has a text tower).")
@click.option("--allow-incomplete", is_flag=True,
              help="Use a cache whose extraction has not finished (or is still running): its finished shards only.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON (top1, top5 as fractions).")
def zeroshot(cache_path, allow_incomplete, as_json):
    """Zero-shot classification from the cached final image embeddings and class-name text embeddings.

    Each frame's embedding is L2-normalised, averaged over the clip's frames and over the video's views,
    and compared by cosine similarity with the normalised text embeddings: the CLIP zero-shot baseline,
    with no training and no re-extraction.

    Example: cachefeat zeroshot --cache k400_val.zarr
    """
    from .store import open_cache
    from .train.coverage import describe
    from .train.zeroshot import zero_shot
    r = zero_shot(open_cache(cache_path), allow_incomplete)
    if as_json:
        click.echo(json.dumps(r, allow_nan=False))
    else:
        cov = r["coverage"]
        click.echo(f"zero-shot on {r['videos']} videos, {r['classes']} classes: top-1 {100 * r['top1']:.2f}%  "
                   f"top-5 {100 * r['top5']:.2f}%  (chance {100 / max(r['classes'], 1):.2f}%; "
                   f"{describe({**cov, 'usable': cov['evaluated']})})")


# ------------------------------------------------------------------------------------------- verify
@cli.command()
@click.argument("cache", type=_PathOrURL())
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def verify(cache, as_json):
    """Read every chunk of a cache (a folder, or an s3://bucket/prefix URL), check its checksums and metadata,
    and list the clips to re-extract.

    Exit status 0 when the cache is sound, 1 when something is damaged. Damaged shards are mended with
    `cachefeat extract <same arguments> --repair`; a damaged cache in a bucket (s3://...) by pushing it again
    from a sound local copy (`cachefeat push`).

    Example: cachefeat verify k400_train.zarr
    """
    from tqdm import tqdm

    from .store import Cache, open_cache
    from .store import verify as run_verify
    c = open_cache(cache)
    with tqdm(total=int(c.shard_done().sum()), unit="shard", desc="verify", disable=as_json, leave=False) as bar:
        rep = run_verify(c, progress=bar.update)
    d = rep.to_dict(c)
    if as_json:
        click.echo(json.dumps(d, indent=2))
    else:
        click.echo(f"{cache}: checked {rep.chunks_checked} chunks of {int(c.shard_done().sum())} finished shards")
        for msg in rep.fatal:
            click.echo(f"  FATAL {msg}")
        for name, rows in rep.damaged.items():
            click.echo(f"  damaged: {name} rows {ranges(sorted(rows))}")
        for msg in rep.suspicious:
            click.echo(f"  suspicious: {msg}")
        for name in rep.tables:
            click.echo(f"  damaged: table {name} (written at creation) is not what was written then")
        if rep.ok:
            click.echo("  ok: every chunk reads, matches its checksum and is the one recorded at its place")
        elif not rep.fatal:
            vids = d["videos_to_reextract"]
            verb = "re-extract" if c.repair == Cache.repair else "restore"
            todo = ([f"{verb} {len(d['clips_to_reextract'])} clips of {len(vids)} videos "
                     f"({', '.join(map(str, vids[:8]))}{', ...' if len(vids) > 8 else ''})"] if vids else []) + \
                   ([f"write {len(rep.tables)} tables again"] if rep.tables else [])
            how = ("run the same `cachefeat extract` command with --repair" if c.repair == Cache.repair
                   else f"mend them with {c.repair}")
            click.echo(f"  {' and '.join(todo)}: {how}")
    if not rep.ok:
        sys.exit(1)


@cli.command()
@click.argument("cache", type=click.Path(exists=True, file_okay=False))
@click.argument("url", metavar="s3://BUCKET/PREFIX")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--break-lease", is_flag=True,
              help="Remove the prefix's lease (cachefeat.lease) first, whoever holds it: for a push that was killed "
                   "before its lease expired. Never while that push may still run.")
def push(cache, url, quiet, break_lease):
    """Upload a finished local cache to an S3-compatible object store (Amazon S3, MinIO, Cloudflare R2, Ceph,
    GCS's S3 API), where train, eval, info and verify read it by its URL.

    Every file becomes one object (large ones in parts) with its CRC32C recorded on it and checked on arrival;
    the data go first, the record of finished shards and the cache's root document last, so a push that is
    cut off never reads as a complete cache. Running it again uploads only the objects that are missing or
    differ, and deletes those the local cache no longer holds. While it runs, a lease object at the prefix
    (cachefeat.lease, renewed, expiring 10 minutes after a killed push) makes a second push to it exit 1.
    The server and credentials come from the AWS_* environment variables (AWS_ENDPOINT_URL for MinIO, R2,
    Ceph): docs/object-storage.md.

    \b
    Example:
      AWS_ENDPOINT_URL=http://minio:9000 cachefeat push k400_val.zarr s3://features/k400/val.zarr
      cachefeat eval --checkpoint runs/evl --cache s3://features/k400/val.zarr
    """
    from .store import open_cache
    from .store.remote import parse_url
    from .store.remote import push as run_push
    loc = parse_url(url)
    c = open_cache(cache)
    if c.being_written_by() is not None:
        raise click.UsageError(f"{cache} is being written by an extraction: push it once that has finished")
    if not c.complete:
        done = c.shard_done()
        raise click.UsageError(f"{cache} is incomplete ({int(done.sum())} of {len(done)} shards written): finish it "
                               f"with the same `cachefeat extract` command (it resumes), then push it")
    with _progress_bar("push", "object", quiet) as bar:
        def tick(n, total=None):
            if total is not None:
                bar.total = total
                bar.refresh()
            bar.update(n)
        s = run_push(c, loc, progress=tick, break_lease=break_lease,
                     warn=lambda line: click.echo(f"warning: {line}", err=True))
    click.echo(f"pushed {cache} to {loc.url}: uploaded {s['uploaded']} objects ({human_bytes(s['bytes'])}), "
               f"skipped {s['skipped']} unchanged, deleted {s['deleted']} the cache no longer holds")


# ------------------------------------------------------------------------------------------- export / import
@cli.command()
@click.argument("cache", type=_PathOrURL(file_okay=False))
@click.argument("out", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["hdf5", "npy"]), required=True,
              help="hdf5: one file mirroring every array and attribute of the cache, re-importable with "
                   "`cachefeat import`. npy: a folder with {stem}_{array}.npy per valid video (video_features "
                   "layout) and index.json (metadata, classes, id -> stem mapping, failed videos).")
@click.option("--compression", default=None,
              help="HDF5 only: gzip[:LEVEL] (1-9), lzf or none; byte shuffle is always on. [default: gzip:1, "
                   "readable by every HDF5 tool; higher levels saved under 2% more for 30-50% more time, and lzf "
                   "saved nothing on float16 features (README, Export and import)]")
@click.option("--allow-incomplete", is_flag=True,
              help="Export a cache whose extraction has not finished (hdf5: everything, with its progress flags; "
                   "npy: the videos of finished shards).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it is an earlier export of the same format.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def export(cache, out, fmt, compression, allow_incomplete, overwrite, quiet):
    """Export a cache to HDF5 (lossless, for other tools and `cachefeat import`) or to per-video .npy files.

    CACHE is a folder or the s3://BUCKET/PREFIX URL of a bucket cache (docs/object-storage.md), which exports
    the same as its local copy; OUT is a local path. A cache still being written (a bucket's: a live lease) is
    refused, as is an incomplete one unless --allow-incomplete. `cachefeat import` reads and writes local files
    only (push the imported cache to put it in a bucket).

    \b
    Examples:
      cachefeat export k400_val.zarr k400_val.h5 --format hdf5
      cachefeat export k400_val.zarr k400_val_npy --format npy
      cachefeat export s3://features/k400/val.zarr k400_val.h5 --format hdf5
    """
    from .store.exchange import DEFAULT_COMPRESSION, export_hdf5, export_npy, parse_compression
    if fmt == "npy" and compression is not None:
        raise click.UsageError("--compression applies to --format hdf5 only (.npy files are not compressed)")
    compression = compression or DEFAULT_COMPRESSION
    parse_compression(compression)  # a bad value fails before any work
    if fmt == "hdf5":
        s = export_hdf5(cache, out, compression, overwrite, allow_incomplete, progress=not quiet)
        click.echo(f"exported {s.arrays} arrays ({human_bytes(s.raw_bytes)}) to {out}: {human_bytes(s.out_bytes)} "
                   f"({compression}) in {s.seconds:.1f} s")
    else:
        s = export_npy(cache, out, overwrite, allow_incomplete, progress=not quiet)
        click.echo(f"exported {s.videos} videos ({s.files} files, {human_bytes(s.out_bytes)}) to {out} in "
                   f"{s.seconds:.1f} s; {s.failed_videos} failed videos listed in {out}/index.json")


@cli.command("import")
@click.argument("input", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "-o", required=True, type=click.Path(),
              help="The cache to write (a Zarr v3 store, e.g. k400_val.zarr).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it is a cachefeat cache.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def import_(input, out, overwrite, quiet):
    """Rebuild a cache from an HDF5 file written by `cachefeat export --format hdf5`.

    The store gets the original's layout, chunks, sharding, codecs and metadata, and equal arrays. The file and
    --out are local; to put the cache in a bucket, push it afterwards (`cachefeat push`).

    Example: cachefeat import k400_val.h5 --out k400_val.zarr
    """
    from .store.exchange import import_hdf5
    s = import_hdf5(input, out, overwrite, progress=not quiet)   # a file system error: one line (the group's)
    click.echo(f"imported {s.arrays} arrays ({human_bytes(s.raw_bytes)}) into {out}: {human_bytes(s.out_bytes)} "
               f"on disk in {s.seconds:.1f} s (cachefeat info {out})")
