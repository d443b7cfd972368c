"""`tpcompile report` on a real two-point sweep, the layer picture of `inspect render=true`, Hydra's switches
and the Slurm launcher config."""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.slow  # every test here runs the CLI in a subprocess


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    # the guide's sweep example (docs/guide.md, "Sweeps and Slurm"): bench at tp=1,2, then its report
    bin_dir = str(Path(sys.executable).parent)  # this environment's `tpcompile`
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "EXTRA": f"bench.prompt_len=16 out_dir={tmp}/engines"}
    r = subprocess.run(["bash", str(REPO / "examples" / "sweep.sh"), str(tmp / "sweep")], cwd=tmp, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp / "sweep" / "report.csv").stat().st_size and (tmp / "sweep" / "speedup.png").stat().st_size
    return tmp / "sweep"


def test_report_tables_a_sweep_and_draws_it(run_cli, sweep):
    r = run_cli("report", str(sweep), cwd=sweep)
    assert r.returncode == 0, r.stderr
    records = {json.loads((sweep / j / "bench.json").read_text())["tp"]: j for j in ("0", "1")}
    assert records == {1: "0", 2: "1"}
    rows = list(csv.DictReader(open(sweep / "report.csv")))
    assert [(row["job"], row["tp"], row["backend"]) for row in rows] == [("0", "1", "eager"), ("1", "2", "eager")]
    p50 = [json.loads((sweep / j / "bench.json").read_text())["decode_ms_p50"] for j in ("0", "1")]
    assert float(rows[0]["speedup"]) == pytest.approx(1.0)
    assert float(rows[1]["speedup"]) == pytest.approx(p50[0] / p50[1], rel=1e-6)  # speed-up vs tp=1
    assert float(rows[1]["efficiency"]) == pytest.approx(p50[0] / p50[1] / 2, rel=1e-6)
    run = [json.loads((sweep / j / "bench.json").read_text())["decode_ms_run"] for j in ("0", "1")]
    profiled = json.loads((sweep / "0" / "bench.json").read_text())
    assert profiled["kernel_ms_per_step"] is None and profiled["top_kernels"] is None  # kernels: GPU only
    assert "kernel_busy" not in profiled
    # what the optional passes changed, from the artifact: fuse_linears on any device, the GPU passes not on the CPU
    decode = profiled["pass_changes"]["decode"]
    assert decode["fuse_linears"] and "one_row_linear" not in decode
    # the profiled steps' wall: a step's order, not the profiler starting and collecting (that was hundreds of
    # steps); on the CPU the profiler's cost per op makes a tiny model's profiled step up to ~4x an unprofiled one
    assert 0 < profiled["profiled_ms_per_step"] < 20 * profiled["decode_ms_p99"]
    assert [float(row["decode_ms_run"]) for row in rows] == pytest.approx(run, rel=1e-6)
    md = (sweep / "report.md").read_text()
    assert md in r.stdout + "\n" and "| 1 | tp=2 | llama_tiny | eager | float32 | 2 |" in md
    assert [row["swept"] for row in rows] == ["tp=1", "tp=2"] and "bench.new_tokens=8" in rows[1]["overrides"]

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.image
    for name in ("decode.png", "speedup.png", "percentiles.png"):
        data = (sweep / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE, name
        image = matplotlib.image.imread(sweep / name)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300 and image.std() > 0, name


def test_report_of_an_empty_dir_is_one_line(run_cli, tmp_path):
    r = run_cli("report", str(tmp_path), cwd=tmp_path)
    assert r.returncode == 2 and "no bench.json or verify.json" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_inspect_render_draws_one_layer(run_cli, tmp_path):
    r = run_cli("inspect", "tp=2", "inspect.render=true", "inspect.render_layer=1", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "layers.1.attn.wq.weight" in r.stdout  # the text plan is printed with or without Graphviz
    text = (tmp_path / "run" / "layer1.txt").read_text()
    assert "layers.1.attn.wo" in text and "layers.0." not in text
    ops = [line.split()[1] for line in text.splitlines()[1:]]
    assert ops.count("all_reduce") == 2 and ops.count("wait_tensor") == 2 and "P(sum)" in text  # two partial sums meet replicated consumers
    dot = (tmp_path / "run" / "layer1.dot").read_text()
    assert "octagon" in dot and "#fdae6b" in dot and "#9ecae1" in dot  # collectives, partial, sharded
    if shutil.which("dot") is None:
        assert "apt-get install graphviz" in r.stdout
        pytest.skip("Graphviz's `dot` is not installed: the SVG is not drawn (DOT and text checked)")
    svg = (tmp_path / "run" / "layer1.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg and "all_reduce" in svg


def test_render_layer_out_of_range_names_the_layers(run_cli, tmp_path):
    r = run_cli("inspect", "inspect.render=true", "inspect.render_layer=9", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert r.returncode == 2 and "render_layer=9: the graph's layers are layers.0..layers.1" in r.stderr


def test_cfg_job_and_info_are_hydras(run_cli, tmp_path):
    r = run_cli("bench", "--cfg", "job", "tp=4", "bench.new_tokens=8", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    from omegaconf import OmegaConf
    cfg = OmegaConf.create(r.stdout)
    assert cfg.tp == 4 and cfg.bench.new_tokens == 8 and cfg.inspect.render is False and "hydra" not in cfg
    assert not (tmp_path / "outputs").exists()  # printing the config runs nothing
    r = run_cli("verify", "--info", "defaults", cwd=tmp_path)
    assert r.returncode == 0 and "model/llama_tiny" in r.stdout and "plan/megatron" in r.stdout, r.stderr


def test_slurm_launcher_config_composes(run_cli, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install hydra-submitit-launcher")
    r = run_cli("bench", "tp=2", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "--cfg", "hydra",
                  "-p", "hydra.launcher", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    from omegaconf import OmegaConf
    launcher = OmegaConf.create(r.stdout)
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.partition == "gpu" and launcher.tasks_per_node == 1 and launcher.nodes == 1
