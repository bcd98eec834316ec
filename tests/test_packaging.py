"""The wheel: one import package, `flashu_batch`, holding every subpackage and the shipped tiny-shapes model, and
the `flashu-batch` command. Built from a copy of the source tree (what git would hold): an in-place build reuses
the build/ folder of earlier builds, whose stale files would end up in the wheel, and would write into the tree
beside other work."""

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOT_SOURCE_AT_TOP = {".git", ".venv", "build", "out", ".pytest_cache"}  # see .gitignore


def source_copy(dst: str) -> str:
    def ignore(folder, names):
        top = NOT_SOURCE_AT_TOP if os.path.samefile(folder, REPO) else set()
        return {n for n in names if n in top or n == "__pycache__" or n.endswith(".egg-info")}

    shutil.copytree(REPO, dst, ignore=ignore)
    return dst


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("wheel")
    src = source_copy(str(tmp / "src"))
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", ".", "-w", str(tmp / "dist")],
                            cwd=src, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    built = [f for f in os.listdir(tmp / "dist") if f.endswith(".whl")]
    assert len(built) == 1, built
    return str(tmp / "dist" / built[0])


def test_the_wheel_holds_flashu_batch_only_with_its_model_and_command(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        dist_info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
        assert dist_info.startswith("flashu_batch-")
        assert {n.split("/")[0] for n in names} == {"flashu_batch", dist_info}
        for path in ("flashu_batch/__init__.py", "flashu_batch/showo2/modeling.py", "flashu_batch/app/cli.py",
                     "flashu_batch/app/validate.py", "flashu_batch/scheduler/processor.py",
                     "flashu_batch/showo2/checkpoints/tiny-shapes/config.json",
                     "flashu_batch/showo2/checkpoints/tiny-shapes/model.safetensors"):
            assert path in names, path
        scripts = z.read(f"{dist_info}/entry_points.txt").decode()
    assert "[console_scripts]" in scripts and "flashu-batch = flashu_batch.app.cli:main" in scripts


def test_the_unpacked_wheel_imports_on_its_own(wheel, tmp_path):
    """Its files alone (PYTHONPATH ahead of the editable install): the public import, the command line and the
    shipped model all come from inside flashu_batch/."""
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp_path / "site")
    code = ("import os, flashu_batch; from flashu_batch import build_processor; "
            "import flashu_batch.app.cli, flashu_batch.showo2.modeling as m; "
            "print(flashu_batch.__file__); print(m.__file__); print(build_processor.__module__)")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    init, modeling, module = result.stdout.split()
    assert init == str(tmp_path / "site" / "flashu_batch" / "__init__.py")
    assert modeling == str(tmp_path / "site" / "flashu_batch" / "showo2" / "modeling.py")
    assert module == "flashu_batch.scheduler.processor"


def test_build_processor_imports_from_the_installed_package(tmp_path):
    result = subprocess.run([sys.executable, "-c", "from flashu_batch import build_processor"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
