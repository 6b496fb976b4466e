"""Installing without the native layer: a pure-Python gradstats that says so and works.

Each test installs a copy of the source tree with pip into a temporary folder (no index,
no dependencies, the environment's own setuptools and torch, as the README's set-up does)
and imports it in a fresh interpreter. About 10-20 s each.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("setup.py", "setup.cfg", "README.md", "LICENSE", "gradstats", "csrc")
PIP_TIMEOUT_S = 600

# What the installed copy reports, and one clip it runs on CPU against torch's.
# The environment's own editable install of gradstats (make test) maps gradstats._C to the
# checkout's build through a finder on sys.meta_path, ahead of PYTHONPATH: set aside here.
PROBE = """
import sys
sys.meta_path = [f for f in sys.meta_path
                 if not getattr(f, "__module__", "").startswith("__editable__")]
import json, torch, gradstats
params = [torch.nn.Parameter(torch.randn(7, 3)) for _ in range(3)]
for p in params:
    p.grad = torch.randn_like(p) * 10
twins = [p.grad.clone() for p in params]
total = gradstats.fused_clip_grad_norm_(params, 1.0)
expected = torch.nn.utils.get_total_norm(twins)
print(json.dumps({"file": gradstats.__file__, "cpu": gradstats.backend_info()["cpu"],
                  "close": bool(torch.allclose(total, expected))}))
"""


def _install_copy(tmp_path: Path, **env_overrides: str) -> tuple[Path, str]:
    """The installed folder and pip's verbose log (where setup.py's warnings show)."""
    source = tmp_path / "source"
    source.mkdir()
    for name in SOURCES:
        origin = REPO / name
        if origin.is_dir():
            shutil.copytree(origin, source / name,
                            ignore=shutil.ignore_patterns("__pycache__", "_C*.so", "*.pyc"))
        else:
            shutil.copy2(origin, source / name)
    site = tmp_path / "site"
    env = {**os.environ, **env_overrides}
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps",
         "--no-index", "--verbose", "--target", str(site), str(source)],
        env=env, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    return site, log


def _probe(site: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("GRADSTATS_BACKEND", None)
    result = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                            text=True, timeout=300, cwd=site)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_no_native_switch_installs_pure_python_that_says_so(tmp_path):
    site, _ = _install_copy(tmp_path, GRADSTATS_NO_NATIVE="1")
    assert not list((site / "gradstats").glob("_C*"))
    report = _probe(site)
    assert Path(report["file"]).is_relative_to(site)
    assert report["cpu"].startswith("PyTorch reference (gradstats._C not built")
    assert report["close"]


@pytest.mark.skipif(sys.platform != "linux", reason="the native layer builds on Linux only")
def test_a_failing_compiler_still_installs_pure_python(tmp_path):
    # /bin/false exists, so the build is attempted, and every compile step fails.
    site, log = _install_copy(tmp_path, CXX="false", CC="false", GRADSTATS_NO_NATIVE="0")
    assert "the native CPU layer (gradstats._C) was not built" in log
    assert not list((site / "gradstats").glob("_C*"))
    report = _probe(site)
    assert report["cpu"].startswith("PyTorch reference (gradstats._C not built")
    assert report["close"]
