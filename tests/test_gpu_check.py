"""`make gpu-check`'s CPU mode: benchmarks/gpu_check.py runs every step at toy sizes without CUDA (the
tiny ViT in both model slots) and its JSON holds every step's figures, so the GPU check cannot rot between
GPU runs. Runs the real script in its own process, writing into tmp_path (nothing lands in results/)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gpu_check_cpu_mode_writes_every_steps_figures(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu", "--out", str(tmp_path)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "CPU MODE" in res.stdout
    (path,) = tmp_path.glob("cpu-*-gpu.json")
    assert path.with_suffix(".log").is_file()
    r = json.loads(path.read_text())
    assert r["mode"] == "cpu" and r["card"] == "cpu"
    assert not [n for n, s in r["steps"].items() if "failed" in s], r["steps"]
    assert {"videos", "tests", "stage_one", "tuning", "nvdec", "stage_two", "distributed"} <= set(r["steps"])
    # tests/test_gpu.py ran under pytest and skipped itself (no CUDA)
    assert r["tests"]["exit_code"] == 0 and r["tests"].get("skipped", 0) >= 1
    # stage one: both model slots, both tap sets, the efficiency against the smallest ceiling named
    for key in ("B16/cls", "B16/last4", "L14/cls", "L14/last4"):
        s1 = r["stage_one"][key]
        ceilings = {"bare forward": s1["forward_frames_per_s"], "decoders alone": s1["decoders_frames_per_s"],
                    "writer alone": s1["writer_frames_per_s"]}
        assert all(v > 0 for v in ceilings.values())
        assert s1["limiting_ceiling"] == min(ceilings, key=ceilings.get)
        assert s1["efficiency"] == pytest.approx(s1["pipeline_frames_per_s"] / min(ceilings.values()))
    # the tuning table: every variant either measured or skipped with its reason
    rows = r["tuning"]["rows"]
    variants = {row["variant"] for row in rows}
    assert {"default", "sdpa off (math kernel)", "precision bf16", "torch.compile",
            "CUDA graphs (compile reduce-overhead)"} <= variants
    assert any(v.startswith("batch ") for v in variants)
    for row in rows:
        assert row.get("frames_per_s", 0) > 0 or row.get("skipped") or row.get("failed"), row
    assert {row["model_slot"] for row in rows} == {"B16", "L14"}
    graphs = next(row for row in rows if row["variant"].startswith("CUDA graphs") and row["model_slot"] == "B16")
    assert "CUDA" in graphs["skipped"]
    assert "nvdec" in r["nvdec"]["skipped"]
    # stage two
    s2 = r["stage_two"]
    assert s2["reader"]["clips_per_s"] > 0 and s2["reader"]["pinned_async_gib_per_s"] > 0
    assert set(s2["step_seconds"]) == {"temporal", "evl", "dist"} and all(v > 0 for v in s2["step_seconds"].values())
    assert s2["online_vs_cached"]["online_step_seconds"] > 0 and s2["online_vs_cached"]["cached_step_seconds"] > 0
    assert 0 <= s2["busy"]["busy_share"] <= 1
    # the distributed step (gloo on CPU) and Ray Train's skip with its reason
    d = r["distributed"]
    assert d["backend"] == "gloo" and d["world_size"] == 1 and d["ddp_step_seconds"] > 0 and d["losses_finite"]
    assert d["ray_train"]["skipped"]
    # every optional part missing here is named with a reason
    for name in ("PyNvVideoCodec", "torchcodec"):
        assert "not installed" in r["skips"][name]
