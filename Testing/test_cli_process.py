"""`python -m CLIPSegLib.cli` as a separate process: what a shell user sees on stdout, stderr and in the exit code."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _env(tmp_path):
    return {**os.environ, "PYTHONPATH": str(ROOT / "CLIPSeg"), "CLIPSEG_HOME": str(tmp_path / "home"),
            "CUDA_VISIBLE_DEVICES": ""}


def _cli(*args):
    return [sys.executable, "-m", "CLIPSegLib.cli", *[str(a) for a in args]]


def test_a_closed_stdout_pipe_ends_quietly_not_as_a_disk_error(tmp_path):
    """`clipseg models list | head -1`: the reader closes the pipe before clipseg writes. Closing our end at once
    makes that certain (head only makes it likely)."""
    p = subprocess.Popen(_cli("models", "list"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(tmp_path))
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141, err
    assert err == ""
    shell = subprocess.run(f"{' '.join(map(str, _cli('models', 'list')))} | head -1", shell=True, capture_output=True,
                           text=True, env=_env(tmp_path))
    assert shell.stdout.startswith("id ") and shell.stderr == ""


def test_segment_prints_only_its_own_lines_on_stderr(phantom_file, tiny_model, tmp_path):
    """Library noise (MONAI's divide-by-zero warning on a constant image, FutureWarnings, ITK warnings) is off."""
    from CLIPSegLib.io.geometry import Geometry
    from CLIPSegLib.io.outputs import write_volume

    path, _, _ = phantom_file
    constant = write_volume(tmp_path / "constant.nrrd", np.full((3, 16, 16), 7.0, np.float32),
                            Geometry.axis_aligned((1.0, 1.0, 1.0)))
    for source in (path, constant):
        out = tmp_path / f"{Path(source).stem}.seg.nrrd"
        r = subprocess.run(_cli("segment", source, "--prompt", "cyst", "--prompt", "thyroid nodule", "--output", out,
                                "--model", tiny_model, "--device", "cpu", "--progress", "none"),
                           capture_output=True, text=True, env=_env(tmp_path), timeout=300)
        assert r.returncode == 0, r.stderr
        lines = r.stderr.splitlines()
        assert len(lines) == 2 and all(re.match(r"'(cyst|thyroid nodule)': (found|not found)", line)
                                       for line in lines), r.stderr
        assert r.stdout == f"wrote {out}\n"


def test_non_ascii_names_print_on_an_ascii_terminal(phantom_file, tiny_model, tmp_path):
    path, _, _ = phantom_file
    out = tmp_path / "结果.seg.nrrd"
    r = subprocess.run(_cli("segment", path, "--prompt", "甲状腺结节", "--output", out, "--model", tiny_model,
                            "--device", "cpu", "--progress", "none"),
                       capture_output=True, env={**_env(tmp_path), "PYTHONIOENCODING": "ascii"}, timeout=300)
    assert r.returncode == 0, r.stderr.decode()
    assert out.exists() and r.stdout.decode("ascii").startswith("wrote ")
    assert r.stderr.decode("ascii").startswith("'\\u7532\\u72b6\\u817a\\u7ed3\\u8282': ")
