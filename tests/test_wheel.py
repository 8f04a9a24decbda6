"""The built wheel holds every pass: passes/ and kernels/ really map to graphopt.passes / graphopt.kernels."""

import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PASS_MODULES = sorted(p.stem for p in (ROOT / "passes").glob("*.py") if p.stem != "__init__")


@pytest.mark.slow
def test_wheel_contains_and_imports_every_pass(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("graphopt-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for mod in PASS_MODULES:
        assert f"graphopt/passes/{mod}.py" in names, f"{mod} missing from the wheel"
    assert "graphopt/kernels/__init__.py" in names
    assert not [n for n in names if n.startswith(("passes/", "kernels/", "tests/"))]
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    script = textwrap.dedent(f"""
        import sys
        # hide the editable install of this checkout so the import must come from the wheel
        sys.meta_path = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()]
        sys.path.insert(0, {str(site)!r})
        import graphopt, importlib
        assert graphopt.__file__.startswith({str(site)!r}), graphopt.__file__
        for mod in {PASS_MODULES!r}:
            importlib.import_module("graphopt.passes." + mod)
        import graphopt.kernels
        print(",".join(sorted(graphopt.registered_passes())))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, check=True, capture_output=True, text=True)
    assert {"dce", "fuse", "remove-identity"} <= set(out.stdout.strip().split(","))
