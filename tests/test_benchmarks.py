"""The training-cost benchmark's pieces on the tiny ViT (seconds): the inserted ST-Adapters start as the
frozen backbone and are the only thing that trains, and every variant takes an optimizer step."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from cachefeat.extract.backbone import load_backbone  # noqa: E402

from bench_training import VARIANTS, Variant  # noqa: E402
from conftest import TINY  # noqa: E402
from st_adapter import insert_st_adapters  # noqa: E402


def test_inserted_st_adapters_start_as_the_frozen_backbone_and_alone_get_gradients():
    bb = load_backbone(TINY, "none", device="cpu")
    x = torch.randn(2 * 4, 3, 32, 32)
    before = bb.visual(x)
    params = insert_st_adapters(bb.visual, frames=4)
    after = bb.visual(x)
    torch.testing.assert_close(before, after)            # zero-initialised up projections
    after.sum().backward()
    assert all(p.grad is not None for p in params)
    assert all(p.grad is None for n, p in bb.visual.named_parameters() if ".adapter." not in n)
    assert sum(p.numel() for p in params) < 0.2 * sum(p.numel() for p in bb.visual.parameters())


@pytest.mark.parametrize("kind", VARIANTS)
def test_every_training_cost_variant_takes_a_step(kind):
    v = Variant(kind, TINY, "cpu", clips=2, frames=4)
    before = [p.detach().clone() for p in v.params]
    loss = v.step()
    assert loss > 0 and any(not torch.equal(a, p) for a, p in zip(before, v.params))
    if kind == "finetune":
        assert v.trainable_params() > sum(p.numel() for p in v.adapter.parameters())


def test_the_long_section_reports_both_lengths_and_their_ratios():
    """The report of `run.py --sections long` from a result of its shape (the section itself takes minutes:
    its kept result is benchmarks/results/vm-20261201-long.json)."""

    from run import report
    kept = json.loads((Path(__file__).resolve().parents[1] / "benchmarks/results/vm-20261201-long.json").read_text())
    text = report(kept)
    assert "one video of 10 min vs 60 min" in text and text.count("| peak RSS") == 2
    lg = kept["sections"]["long"]
    assert lg["per_length"]["60"]["samples"] == 3600 and lg["per_length"]["10"]["samples"] == 600
    assert all(lg["ratios"][k]["ratio"] <= lg["ratios"][k]["goal"] for k in ("peak_mib", "decode_worker_mib"))


def test_the_io_section_alternates_decoders_and_pipeline_at_steady_state(synth_small, tmp_path):
    """The io section's decoders-alone and free-backbone rounds, on the tiny ViT's shapes and the test videos
    (the real section takes minutes on ViT-B/16's: its kept result is benchmarks/results/vm-20261202-io-7.json):
    every round measures both, the pipeline's frames are those of the shards finished after the round's
    first, and the report shows the rounds."""
    import bench_io
    from run import report

    from cachefeat.extract.manifest import load_manifest
    from cachefeat.extract.plan import ExtractSettings
    videos = load_manifest(synth_small / "train.txt").videos
    real = load_backbone(TINY, "none", "cpu")
    bb = bench_io.FreeBackbone(**{f: getattr(real, f) for f in real.__dataclass_fields__})
    settings = ExtractSettings(model=TINY, layers="last:2", tokens="all", frames=2, text=False, shard_size=8)
    lines = []
    res = bench_io._decoders_and_pipeline(tmp_path, videos, bb, settings, 1, 1.5, lines.append)
    assert len(res["round_ratios"]) == bench_io.ROUNDS == len(lines)
    assert res["frames"] > 0 and res["frames"] % (8 * 2) == 0          # whole shards of 8 clips of 2 frames
    assert res["decoders_frames_per_s"] > 0 and res["decoders_cpu_ms_per_frame"] > 0
    assert res["cpu_ms_per_frame"] == pytest.approx(res["decoders_in_pipeline_cpu_ms_per_frame"]
                                                    + res["pipeline_process_cpu_ms_per_frame"])
    kept = json.loads((Path(__file__).resolve().parents[1] / "benchmarks/results/vm-20261202-io-7.json").read_text())
    assert "round by round" in report(kept) and "alone 1.58; the pipeline's process 0.81" in report(kept)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """`run.py --smoke` once, in a process of its own, its work folder and result file in tmp folders: every
    section at toy sizes (~3-4 minutes on 2 busy cores). Returns the finished process, the result files it
    made under benchmarks/results/ (none, as it is a smoke run), its results (the --out JSON) and work folder."""
    import os
    import subprocess
    import time
    repo = Path(__file__).resolve().parents[1]
    results = repo / "benchmarks" / "results"
    t0 = time.time()
    work, out = tmp_path_factory.mktemp("bench-work"), tmp_path_factory.mktemp("bench-out") / "smoke.json"
    env = {**os.environ, "CACHEFEAT_BENCH_WORK": str(work)}
    res = subprocess.run([sys.executable, str(repo / "benchmarks" / "run.py"), "--smoke", "--out", str(out)],
                         capture_output=True, text=True, env=env, timeout=900)
    # what a run would have written (<host>-<date>...), made or changed during it (others may add other files)
    import socket
    ours = [p.name for p in results.glob(f"{socket.gethostname()}-{time.strftime('%Y%m%d')}*")
            if p.stat().st_mtime >= t0]
    return res, ours, json.loads(out.read_text()) if out.is_file() else None, work


def _sections():
    from run import SECTIONS
    return SECTIONS


@pytest.mark.parametrize("section", _sections())
def test_smoke_runs_every_section(smoke_run, section):
    """Each section runs its real code path at toy sizes, returns every key of its KEYS (what its docs table
    needs) and its table renders; the smoke run writes nothing under benchmarks/results/."""
    res, written, results, _ = smoke_run
    assert f"[smoke] {section}: " in res.stdout, res.stderr[-3000:]
    line = next(x for x in res.stdout.splitlines() if x.startswith(f"[smoke] {section}: "))
    assert line.endswith("every key present"), (line, res.stderr[-3000:])
    assert res.returncode == 0, res.stderr[-3000:]
    assert written == [] and section in results["sections"]


def test_the_scale_section_runs_every_step_as_a_cachefeat_process_and_reports_ratios(smoke_run):
    """The smoke run's scale section (one size, 8 clips, compared with itself): every step completed, each
    has a time and its own process's peak memory, ablate's largest trial process was found, and the report has
    a row per step."""
    import bench_scale
    from run import report
    res, _, results, work = smoke_run
    assert res.returncode == 0, res.stderr[-3000:]
    scale = results["sections"]["scale"]
    for n in scale["sizes"]:
        r = scale["per_size"][str(n)]
        assert r["eval_videos"] == n
        for step in bench_scale.STEPS:
            assert r["steps"][step]["seconds"] > 0 and r["steps"][step]["peak_mib"] > 100, (n, step)
        assert "ImplicitFunc" in r["steps"]["ablate_trial"]["process"]
    assert set(scale["ratios"]) == set(bench_scale.STEPS)
    assert scale["ratios"]["extract"]["rss_margin"] is None and scale["ratios"]["train"]["rss_goal"] == 1.2
    text = report({"sections": {"scale": scale}})
    assert "ablate: largest trial process" in text and text.count("| train (streamed) |") == 1
    n = scale["sizes"][-1]
    names = (work / "scale" / f"list-{n}.txt").read_text().splitlines()
    assert len(set(line.split("\t")[0] for line in names)) == n and names[1].endswith("\taction 001")


def test_smoke_checks_the_keys_a_section_declares():
    """A result missing a declared key (or holding no entries where '*' asks for them) is named."""
    from common import check_keys
    keys = ("a", "b.c", "d.*.e")
    assert check_keys({"a": 1, "b": {"c": 2}, "d": {"x": {"e": 3}, "y": {"e": 4}}}, keys, "s") == []
    assert check_keys({"b": {}, "d": {"x": {"e": 3}, "y": {}}}, keys, "s") == ["s: a", "s: b.c", "s: d.y.e"]
    assert check_keys({"a": 1, "b": {"c": 2}, "d": {}}, keys, "s") == ["s: d has no entries"]


def test_mean_ci_is_the_t_interval():
    """The 95% t-interval of three seeds (t = 4.303 at 2 degrees of freedom); one seed has none."""
    import statistics

    from common import mean_ci
    v = [0.81, 0.86, 0.81]
    r = mean_ci(v)
    h = 4.303 * statistics.stdev(v) / 3 ** 0.5
    assert r["mean"] == pytest.approx(statistics.mean(v)) and r["half_width"] == pytest.approx(h)
    assert r["ci95"] == pytest.approx([r["mean"] - h, r["mean"] + h]) and r["n"] == 3
    assert mean_ci([0.5])["ci95"] is None
    assert mean_ci([1.0] * 40)["half_width"] == 0


def test_compare_prints_every_shared_figure_with_its_ratio_and_flags_moves(tmp_path, capsys):
    """`run.py compare OLD NEW`: shared numeric figures side by side with new / old, flagged beyond the
    threshold; figures in one file only are counted, strings and booleans are not figures."""
    from run import main
    old = {"date": "2026-11-23", "mode": "quick", "sections": {
        "training": {"ViT-B/32": {"variants": {"online": {"time_over_cached": 4.0, "ms_per_step": 100},
                                               "cached": {"ms_per_step": 25}}, "device": "cpu"}},
        "reading": {"efficiency": 0.9, "only_old": 1.0, "verdict": "met", "ok": True}}}
    new = {"date": "2026-12-06", "mode": "quick", "sections": {
        "training": {"ViT-B/32": {"variants": {"online": {"time_over_cached": 2.8, "ms_per_step": 98},
                                               "cached": {"ms_per_step": 35}}, "device": "cpu"}},
        "reading": {"efficiency": 0.95, "verdict": "met", "ok": True, "only_new": [1, 2]}}}
    a, b = tmp_path / "old.json", tmp_path / "new.json"
    a.write_text(json.dumps(old))
    b.write_text(json.dumps(new))
    assert main(["compare", str(a), str(b)]) == 0
    rows = {x.split(" | ")[0].strip("| "): x for x in capsys.readouterr().out.splitlines() if x.startswith("| ")}
    assert "| 4 | 2.8 | 0.700 | **moved** |" in rows["training.ViT-B/32.variants.online.time_over_cached"]
    assert rows["training.ViT-B/32.variants.cached.ms_per_step"].endswith("| 1.400 | **moved** |")
    assert rows["training.ViT-B/32.variants.online.ms_per_step"].endswith("| 0.980 |  |")
    assert rows["reading.efficiency"].endswith("| 1.056 |  |")
    assert not any(k.startswith(("reading.only", "reading.ok", "reading.verdict")) for k in rows)
    assert main(["compare", str(a), str(b), "--threshold", "0.5"]) == 0
    assert "**moved**" not in capsys.readouterr().out
    assert main(["compare", str(a), str(tmp_path / "missing.json")]) == 2


def test_the_s3_libraries_script_runs_at_toy_size(tmp_path):
    """benchmarks/s3_libraries.py (standalone: the S3 client comparison of docs/object-storage.md) on two 1 MiB
    objects, one round: every library present reads back the objects' bytes and writes them, with its figures
    against obstore's (s3fs's sides are left out when s3fs is not installed, as here)."""
    pytest.importorskip("obstore")
    pytest.importorskip("moto")
    import subprocess
    out = tmp_path / "s3.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "s3_libraries.py"
    res = subprocess.run([sys.executable, str(script), "--objects", "2", "--object-mib", "1", "--rounds", "1",
                          "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    got = json.loads(out.read_text())["sections"]["s3_libraries"]
    for what in ("read", "write"):
        assert {"obstore", "boto3"} <= set(got[what])
        assert got[what]["obstore"]["ratio_to_obstore"] == 1.0 and got[what]["boto3"]["median_mib_s"] > 0
    assert out.with_suffix(".log").is_file()
