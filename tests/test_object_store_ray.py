"""Stage two on Ray from a bucket: `train --workers 2` and `ablate` with s3:// caches, against the tests' S3
server (tests/s3server.py) and the session's real local Ray runtime. The runtime was started before this
module set the AWS_* variables, so its workers reach the server only through the driver's settings
(store.remote.worker_settings), as workers on other nodes of a cluster would."""
from __future__ import annotations

import csv
import json

import pytest
import torch

pytest.importorskip("obstore")
pytest.importorskip("boto3")

from test_train_distributed import ARGS  # noqa: E402

from cachefeat.train import load_checkpoint  # noqa: E402

from conftest import run_cli  # noqa: E402

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def bucket_caches(s3, stage2_caches):
    """The stage-two train and val caches pushed to a bucket of their own: {train, val} URLs."""
    bucket = s3.new_bucket()
    urls = {k: f"s3://{bucket}/k/{k}.zarr" for k in ("train", "val")}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in s3.env().items():
            mp.setenv(k, v)
        for k, url in urls.items():
            run_cli("push", stage2_caches[k], url, "-q")
    return urls


def _same_weights(a_dir, b_dir) -> dict:
    a, b = load_checkpoint(a_dir), load_checkpoint(b_dir)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k, v in a["state_dict"].items():
        assert torch.allclose(v, b["state_dict"][k], atol=1e-5), k
    return b


def test_two_ray_workers_train_from_the_bucket_like_one_local_process(ray_session, env, bucket_caches,
                                                                      stage2_caches, tmp_path):
    """Each worker streams its slice of every batch from the bucket, through a local copy of the fetched
    shards on its node; the run equals one process trained on the local caches."""
    one, two, copies = tmp_path / "one", tmp_path / "two", tmp_path / "copies"
    run_cli("train", "--cache", stage2_caches["train"], "--val-cache", stage2_caches["val"], *ARGS, "--out", one,
            "--quiet")
    res = run_cli("train", "--cache", bucket_caches["train"], "--val-cache", bucket_caches["val"], *ARGS,
                  "--workers", "2", "--local-cache", copies, "--out", two)
    assert "read by 2 data-parallel workers" in res.output and f"local copy of fetched shards: {copies}" in res.output
    b = _same_weights(one, two)
    assert b["history"][-1]["val_top1"] == load_checkpoint(one)["history"][-1]["val_top1"]
    summary = json.loads((two / "summary.json").read_text())
    assert summary["workers"] == 2 and summary["train_cache"] == bucket_caches["train"]
    # the workers (not the driver, which reads no feature rows) filled the copy: one file per shard object
    assert len([p for p in copies.iterdir() if len(p.name) == 64]) >= 3


ABLATION = """
train-cache: {train}
val-cache: {val}
train: {{adapter: probe, epochs: 3, batch-size: 20, lr: 0.01, threads: 1}}
grid:
  seed: [0, 1]
"""


def test_an_ablation_from_the_bucket(ray_session, env, bucket_caches, stage2_caches, tmp_path):
    """Two trials whose caches are s3:// URLs in the spec; each trial's weights equal a local `train` run of
    its settings."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(ABLATION.format(**bucket_caches))
    out = tmp_path / "abl"
    res = run_cli("ablate", spec, "--out", out, "--cpus-per-trial", "1", "--local-cache", tmp_path / "copies")
    assert f"on {bucket_caches['train']}" in res.output
    rows = {r["trial"]: r for r in csv.DictReader(open(out / "results.csv"))}
    assert len(rows) == 2 and all(r["status"] == "done" for r in rows.values())
    for name, r in rows.items():
        seed = json.loads((out / "trials" / name / "trial.json").read_text())["config"]["seed"]
        local = tmp_path / f"local-{seed}"
        run_cli("train", "--cache", stage2_caches["train"], "--val-cache", stage2_caches["val"], *ARGS[:-1],
                str(seed), "--out", local, "--quiet")     # the spec's settings
        b = _same_weights(local, out / "trials" / name)
        assert float(r["val_top1"]) == pytest.approx(b["history"][-1]["val_top1"], abs=1e-4)


def test_an_ablation_on_a_missing_bucket_is_one_line(env, stage2_caches, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(ABLATION.format(train="s3://no-such-bucket-cachefeat/t.zarr", val=stage2_caches["val"]))
    res = run_cli("ablate", spec, "--check", ok=False)
    assert res.exit_code == 2 and "no-such-bucket-cachefeat" in res.output and "does not exist" in res.output
    assert len(res.output.strip().splitlines()) == 1
