"""examples/api_example.py runs end to end (its own process, as a user would run it) and the API it shows
agrees with the CLI: the trained adapter loaded with cachefeat.load_adapter scores like `cachefeat eval`."""
import json
import os
import subprocess
import sys

from conftest import REPO, run_cli


def test_api_example_runs_end_to_end(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, str(REPO / "examples" / "api_example.py"), str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    assert "valid clips: 24" in out and "val clips: 8" in out and "failures: []" in out
    run = tmp_path / "runs" / "temporal"
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    acc = float(out.split("| accuracy: ")[1].split()[0])
    m = json.loads(run_cli("eval", "--checkpoint", run, "--cache", tmp_path / "val.zarr", "--json").output)
    assert abs(acc - m["clip_top1"]) < 1e-6     # one view per video: per-clip accuracy from Python = eval's
    import cachefeat
    assert set(cachefeat.__all__) >= {"open_cache", "load_adapter"}
