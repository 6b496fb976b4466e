"""Importing gradstats (and its integrations package) imports no training framework: the
callbacks import theirs only when their own module is imported."""
import pathlib
import subprocess
import sys

import pytest

FRAMEWORKS = ("lightning", "pytorch_lightning", "transformers", "accelerate", "timm")


def test_importing_gradstats_imports_no_framework():
    code = ("import sys, gradstats, gradstats.integrations, gradstats.routing; "
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({FRAMEWORKS!r})))")
    # from the checkout's root, so that its gradstats is the one imported
    root = pathlib.Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, cwd=root)
    assert result.stdout.strip() == "[]"


def test_lightning_callback_falls_back_to_pytorch_lightning():
    pytest.importorskip("pytorch_lightning")
    code = ("import sys; sys.modules['lightning'] = None  # as if not installed\n"
            "import pytorch_lightning\n"
            "from gradstats.integrations.lightning import GradStatsCallback\n"
            "assert issubclass(GradStatsCallback, pytorch_lightning.Callback)\n"
            "assert 'lightning.pytorch' not in sys.modules\n")
    root = pathlib.Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
