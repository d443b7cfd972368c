"""The commands in docs/*.md marked with a `# test` first line run here, so the docs cannot rot; and the
Python API example runs. Each block runs with bash -e in a fresh temp dir with examples/ linked in."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

BLOCK = re.compile(r"^```bash\n# test\n(.*?)^```", re.M | re.S)


def marked_blocks() -> list:
    blocks = []
    for doc in sorted((REPO / "docs").glob("*.md")):
        for i, body in enumerate(BLOCK.findall(doc.read_text())):
            blocks.append(pytest.param(body, id=f"{doc.stem}-{i}"))
    return blocks


def run_in(tmp_path: Path, script: str, timeout=240):
    (tmp_path / "examples").symlink_to(REPO / "examples")
    bin_dir = Path(sys.executable).parent  # the `tpcompile` entry point of this environment
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(REPO)}
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_docs_have_marked_commands():
    assert len(marked_blocks()) >= 5


@pytest.mark.slow
@pytest.mark.parametrize("script", marked_blocks())
def test_doc_commands_run(tmp_path, script):
    r = run_in(tmp_path, script)
    assert r.returncode == 0, f"{script}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}"
