"""Tests for showo2.parity and the `flashu-batch parity` command: the golden set passes, a corrupted copy fails."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from flashu_batch.showo2.parity import compare, run_parity


def run_cli(golden: str) -> subprocess.CompletedProcess:
    exe = shutil.which("flashu-batch")
    cmd = [exe] if exe else [sys.executable, "-m", "flashu_batch.app.cli"]
    return subprocess.run(cmd + ["parity", golden], capture_output=True, text=True, timeout=300)


def case_lines(stdout: str, cases) -> dict[str, str]:
    """The output line of every case: lines look like 'PASS <case>: ...' or 'FAIL <case>: ...'."""
    lines = {}
    for line in stdout.splitlines():
        status, _, rest = line.partition(" ")
        name = rest.split(":", 1)[0]
        if status in ("PASS", "FAIL") and name in cases:
            assert name not in lines, f"case {name} reported twice:\n{stdout}"
            lines[name] = line
    return lines


def output_tensors(meta: dict, case: str) -> list[str]:
    return [n[len(case) + 1:] for n, s in meta["cases"][case]["tensors"].items() if s["role"] == "output"]


def test_cli_passes_on_golden(golden_dir, golden_meta):
    proc = run_cli(golden_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cases = list(golden_meta["cases"])
    lines = case_lines(proc.stdout, cases)
    assert sorted(lines) == sorted(cases), proc.stdout
    for name, line in lines.items():
        assert line.startswith(f"PASS {name}:"), line
        assert " FAIL" not in line, line
        for tensor in output_tensors(golden_meta, name):  # every output tensor is reported
            assert f"{tensor} max_abs=" in line, (tensor, line)


def test_run_parity_in_process(golden_dir, golden_meta):
    results = run_parity(golden_dir)
    assert [r.case for r in results] == list(golden_meta["cases"])
    for r in results:
        assert r.passed, r.line()
        checked = {t.name for t in r.tensors}
        assert set(output_tensors(golden_meta, r.case)) <= checked, (r.case, checked)
        for t in r.tensors:
            assert t.passed and t.ratio <= 1.0 and t.max_abs >= 0, t
    # The sequence builders are checked against the stored layouts of the cases that have them.
    by_case = {r.case: {t.name for t in r.tensors} for r in results}
    assert {"layout.input_ids", "layout.modality_positions"} <= by_case["t2i_velocity"]
    assert {"layout.input_ids", "layout.modality_positions"} <= by_case["mmu"]


@pytest.fixture(scope="module")
def corrupted_golden(golden_dir, tmp_path_factory):
    """A copy of the golden set with t2i_velocity.v_cond shifted by 1e-2 (far above its tolerance)."""
    dst = str(tmp_path_factory.mktemp("golden") / "corrupt")
    shutil.copytree(golden_dir, dst, copy_function=shutil.copyfile,
                    ignore=shutil.ignore_patterns("checkpoint"))
    os.chmod(dst, 0o755)
    os.symlink(os.path.abspath(os.path.join(golden_dir, "checkpoint")), os.path.join(dst, "checkpoint"))
    path = os.path.join(dst, "cases.safetensors")
    os.chmod(path, 0o644)
    data = load_file(path)
    data["t2i_velocity.v_cond"] = data["t2i_velocity.v_cond"] + 1e-2
    save_file(data, path)
    return dst


def test_cli_fails_on_corrupted_copy(corrupted_golden, golden_meta):
    proc = run_cli(corrupted_golden)
    assert proc.returncode != 0, proc.stdout
    cases = list(golden_meta["cases"])
    lines = case_lines(proc.stdout, cases)
    assert sorted(lines) == sorted(cases), proc.stdout
    assert lines["t2i_velocity"].startswith("FAIL t2i_velocity:"), lines["t2i_velocity"]
    # The failing tensor is named; the untouched ones of the same case still pass.
    parts = {p.split(" max_abs=")[0].strip(): p for p in lines["t2i_velocity"].split(": ", 1)[1].split("; ")}
    assert parts["v_cond"].endswith(" FAIL"), parts["v_cond"]
    assert not parts["v_uncond"].endswith(" FAIL") and not parts["v_guided"].endswith(" FAIL"), parts
    for name in cases:
        if name != "t2i_velocity":
            assert lines[name].startswith(f"PASS {name}:"), lines[name]


def test_compare_semantics():
    """allclose is |a - e| <= atol + rtol * |e| elementwise; exact is bit-identical; shapes must agree."""
    expected = torch.tensor([1.0, -10.0, 0.0])
    spec = {"compare": "allclose", "atol": 1e-3, "rtol": 1e-2}
    # Allowances 0.011, 0.101, 0.001: just inside passes, just outside fails.
    assert compare("x", expected + torch.tensor([0.0109, -0.1009, 0.0009]), expected, spec).passed
    assert not compare("x", expected + torch.tensor([0.0, 0.0, 0.0011]), expected, spec).passed
    result = compare("x", expected + torch.tensor([0.0, 0.2, 0.0]), expected, spec)
    assert not result.passed and result.max_abs == pytest.approx(0.2, rel=1e-5)
    assert result.ratio == pytest.approx(0.2 / 0.101, rel=1e-4)
    ids = torch.tensor([[1, 2, 3]])
    assert compare("ids", ids.clone(), ids, {"compare": "exact"}).passed
    assert not compare("ids", torch.tensor([[1, 2, 4]]), ids, {"compare": "exact"}).passed
    assert not compare("x", expected[:2], expected, spec).passed
