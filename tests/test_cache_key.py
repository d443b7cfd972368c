"""The artifact key moves with the compiler's own code, so an edit to a pass or to the weight code is never
answered with an artifact the old code built."""
import importlib.util
import shutil
from pathlib import Path

import tpcompile
from tpcompile.artifact import source_hash


def _artifact_module(package: Path):
    """tpcompile/artifact.py loaded afresh from a copy of the package: its key hashes that copy's files."""
    spec = importlib.util.spec_from_file_location("artifact_of_copy", package / "artifact.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_an_edit_to_the_package_changes_the_cache_key(tmp_path):
    package = Path(tpcompile.__file__).parent
    copy = shutil.copytree(package, tmp_path / "tpcompile", ignore=shutil.ignore_patterns("__pycache__"))
    before = _artifact_module(copy)
    assert before.source_hash() == source_hash.__wrapped__(package)  # the bytes count, not where they are
    (copy / "notes.txt").write_text("not code")
    assert _artifact_module(copy).cache_key({"tp": 2}) == before.cache_key({"tp": 2})
    with open(copy / "passes" / "propagate.py", "a") as f:  # any .py file, in a subpackage too
        f.write("\n# an edit\n")
    after = _artifact_module(copy)
    assert after.cache_key({"tp": 2}) != before.cache_key({"tp": 2})
    assert after.cache_key({"tp": 2}) == after.cache_key({"tp": 2}) != after.cache_key({"tp": 4})
