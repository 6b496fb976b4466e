"""Importing gradstats (and its integrations package) imports no training framework: the
callbacks import theirs only when their own module is imported."""
import pathlib
import subprocess
import sys

FRAMEWORKS = ("lightning", "pytorch_lightning", "transformers", "accelerate", "timm")


def test_importing_gradstats_imports_no_framework():
    code = ("import sys, gradstats, gradstats.integrations, gradstats.routing; "
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({FRAMEWORKS!r})))")
    # from the checkout's root, so that its gradstats is the one imported
    root = pathlib.Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, cwd=root)
    assert result.stdout.strip() == "[]"
