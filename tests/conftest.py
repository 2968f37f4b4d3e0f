"""Shared fixtures: a tiny registered ViT (cachefeat-tiny-ViT: 4 blocks, width 64, 32 px) so most tests
run in seconds, small synthetic data sets written with a real codec, and a CLI runner."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cachefeat.cli import cli
from cachefeat.synth import generate

TINY = "cachefeat-tiny-ViT"
REPO = Path(__file__).resolve().parents[1]


def run_cli(*args, ok: bool = True):
    """Invoke the CLI in-process; asserts success unless ok=False. Returns click's Result."""
    res = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    if ok and res.exit_code != 0:
        raise AssertionError(f"cachefeat {' '.join(map(str, args))} exited {res.exit_code}:\n{res.output}")
    return res


def cli_subprocess(*args, **kw) -> subprocess.Popen:
    """Start the real `cachefeat` command in its own process group (so a test can SIGKILL all of it)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "cachefeat", *map(str, args)], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def tiny_extract_args(manifest, out, *extra):
    return ["extract", manifest, "--out", out, "--model", TINY, "--pretrained", "none", "--quiet",
            "--decode-workers", "1", *extra]


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory) -> Path:
    """4 classes x 4 videos (3 train, 1 val), 16 frames of 64 px."""
    out = tmp_path_factory.mktemp("synth_small")
    generate(out, num_classes=4, videos_per_class=4, frames=16, size=64, seed=0, progress=False)
    return out


@pytest.fixture(scope="session")
def synth_medium(tmp_path_factory) -> Path:
    """6 classes x 12 videos (9 train, 3 val), 16 frames of 64 px: enough to train on."""
    out = tmp_path_factory.mktemp("synth_medium")
    generate(out, num_classes=6, videos_per_class=12, frames=16, size=64, seed=1, progress=False)
    return out


@pytest.fixture(scope="session")
def ray_session():
    """One real local Ray runtime (2 CPU slots) for every test that needs Ray: starting Ray takes ~10 s on 2
    cores, so it starts once. cachefeat's distributed code uses a runtime it finds initialised as it is."""
    import logging

    import ray
    # address="local": never join a cluster that a `ray start` on this machine (or RAY_ADDRESS) points to
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield ray
    ray.shutdown()


# ------------------------------------------------------------------------------------------- stage two
@pytest.fixture(scope="session")
def synth_temporal(tmp_path_factory) -> Path:
    """6 classes x 40 videos (30 train, 10 val), 16 frames of 64 px: enough for temporal adapters to
    learn time-reversed pairs from a random-weight tiny ViT."""
    out = tmp_path_factory.mktemp("synth_temporal")
    generate(out, num_classes=6, videos_per_class=40, frames=16, size=64, seed=2, progress=False)
    return out


@pytest.fixture(scope="session")
def stage2_caches(synth_temporal, tmp_path_factory) -> dict:
    """Tiny-ViT caches of synth_temporal shared by the stage-two tests: every layer with all patch tokens,
    8 frames, 16 px pixels at twice the frames (for dist), class-name text embeddings; train with one view
    per video, val with the 3-clip test protocol (3x1 views)."""
    out = tmp_path_factory.mktemp("stage2")
    common = ["--layers", "all", "--tokens", "all", "--frames", "8", "--shard-size", "64", "--pixels", "16x2"]
    run_cli(*tiny_extract_args(synth_temporal / "train.txt", out / "train.zarr", *common))
    run_cli(*tiny_extract_args(synth_temporal / "val.txt", out / "val.zarr", *common, "--views", "3x1"))
    return {"train": out / "train.zarr", "val": out / "val.zarr", "data": synth_temporal}


@pytest.fixture(scope="session")
def s3():
    """One S3-compatible server for the object-store tests: moto's on 127.0.0.1 (tests/s3server.py), or the
    endpoint in CACHEFEAT_S3_TEST_ENDPOINT."""
    pytest.importorskip("obstore")
    pytest.importorskip("boto3")
    import s3server
    if not s3server.external():
        pytest.importorskip("moto")
    server = s3server.start()
    yield server
    server.stop()


@pytest.fixture
def env(s3, monkeypatch):
    """This test's process reaches the server (cachefeat reads the AWS_* variables at each open)."""
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    return s3

