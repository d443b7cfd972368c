"""The CLI as users run it: subprocesses, Hydra overrides, multirun, one-line errors."""
import json

import pytest


@pytest.mark.slow
def test_multirun_writes_one_record_per_job(run_cli, tmp_path):
    r = run_cli("verify", "-m", "tp=1,2", f"out_dir={tmp_path}/engines", f"hydra.sweep.dir={tmp_path}/sweep",
                  cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    records = [json.loads((tmp_path / "sweep" / str(i) / "verify.json").read_text()) for i in (0, 1)]
    assert [rec["tp"] for rec in records] == [1, 2]
    assert all(rec["ok"] and rec["max_rel_err"] <= 1e-5 for rec in records)
    assert all(rec["torch"] and rec["date"] and rec["commit"] for rec in records)


@pytest.mark.slow
def test_inspect_prints_the_plan_and_writes_no_weights(run_cli, tmp_path):
    r = run_cli("inspect", "tp=4", f"out_dir={tmp_path}/engines", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "layers.0.attn.wk.weight" in r.stdout and "S(0)/2" in r.stdout  # kv heads replicated at tp=4
    assert "insert_collectives: 5" in r.stdout  # 4 all-reduces, the head's all-gather
    assert not (tmp_path / "engines").exists()


@pytest.mark.slow
@pytest.mark.parametrize("overrides, message", [
    (["tp=3"], "dim 0 of size 64 is not divisible by tp=3"),
    (["tp=0"], "tp=0: the tensor-parallel degree must be >= 1"),
    (["dtype=float8"], "dtype='float8': use one of"),
    (["+plan.rules=[{match: nope, style: colwise}]", "plan=replicate"], "'nope' -> colwise matches no parameter"),
    (["runtime.device=tpu"], "runtime.device='tpu': use one of"),
    (["runtime.collectives=nccl"], "runtime.collectives=nccl needs runtime.device=cuda"),
    (["runtime.collectives=mpi"], "runtime.collectives='mpi': use one of"),
    (["bench.new_tokens=1"], "bench.new_tokens=1: the first token comes from prefill"),
    (["backend.skip_passes=[fuse_everything]"], "backend.skip_passes=['fuse_everything']: 'fuse_everything' is not an "
                                                "optional pass; use any of ['fold_repeat_kv', 'fuse_linears'"),
    (["max_seq=64"], "max_seq=64: this key is now generation.max_seq; write generation.max_seq=64"),
    (["generation.max_seq=100"], "generation.max_seq=100 is not a multiple of generation.prefill_chunk=16"),
])
def test_bad_input_is_one_line_and_nonzero(run_cli, tmp_path, overrides, message):
    r = run_cli("verify", *overrides, f"out_dir={tmp_path}/engines", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert r.returncode != 0
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "engines").exists() or not any((tmp_path / "engines").iterdir())


@pytest.mark.slow
def test_bad_inductor_options_are_one_line(run_cli, tmp_path):
    env = {"TPCOMPILE_INDUCTOR_OPTIONS": "{coordinate_descent_tuning: 1}"}
    r = run_cli("compile", "backend=inductor", f"out_dir={tmp_path}/engines", f"hydra.run.dir={tmp_path}/run",
                cwd=tmp_path, env=env)
    assert r.returncode != 0
    assert "TPCOMPILE_INDUCTOR_OPTIONS='{coordinate_descent_tuning: 1}' is not JSON" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "engines").exists() or not any((tmp_path / "engines").iterdir())


@pytest.mark.slow
def test_inductor_options_are_part_of_the_artifact_key(run_cli, tmp_path):
    """An Inductor or AOTInductor engine is compiled with these settings, so other settings must not reuse it."""
    out = tmp_path / "engines"
    for i, value in enumerate(["", '{"coordinate_descent_tuning": true}']):
        env = {"TPCOMPILE_INDUCTOR_OPTIONS": value}
        r = run_cli("compile", "tp=1", "backend=inductor", f"out_dir={out}", f"hydra.run.dir={tmp_path}/run{i}",
                    cwd=tmp_path, env=env)
        assert r.returncode == 0, r.stderr
    assert len([d for d in out.iterdir() if (d / "manifest.json").is_file()]) == 2


@pytest.mark.slow
def test_unknown_model_names_the_choices(run_cli, tmp_path):
    r = run_cli("compile", "model=nope", cwd=tmp_path)
    assert r.returncode != 0 and "llama_tiny" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_debug_shows_the_traceback(run_cli, tmp_path):
    r = run_cli("verify", "tp=3", "--debug", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_usage_lists_every_command_and_every_option_in_conf():
    """The usage text is made from the command table and conf/, so it names what exists and nothing else."""
    from tpcompile.cli import COMMANDS, PATH_COMMANDS, usage
    from tpcompile.config import CONF_DIR
    text = usage()
    for name in [*COMMANDS, *PATH_COMMANDS]:
        assert f"\n  {name} " in text
    for group in ("model", "plan", "backend"):
        line = next(l for l in text.splitlines() if l.strip().startswith(f"{group}="))
        assert sorted(line.split("=", 1)[1].split("|")) == sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_process_age_counts_from_the_process_start():
    """The age `generate` reports its first token at: a child that sleeps 1.0 s before asking is 1.0 s old or more
    (plus its interpreter's start), never less, and not far more."""
    import subprocess
    import sys
    from tests.conftest import REPO
    code = "import time; time.sleep(1.0); from tpcompile.util import process_age; print(process_age())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    age = float(out.stdout)
    assert 1.0 <= age < 8.0, age
