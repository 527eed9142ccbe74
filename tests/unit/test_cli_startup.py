"""`fedmq --help` and a bad config must not import torch (about 2 CPU seconds and 290 MB each)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def run_fedmq(args: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run `python -X importtime -m fedmq ARGS`; the result and the top-level modules it imported."""
    proc = subprocess.run([sys.executable, "-P", "-X", "importtime", "-m", "fedmq", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)
    imported = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            imported.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    assert imported, proc.stderr[-2000:]  # -X importtime worked
    proc.stderr = "\n".join(line for line in proc.stderr.splitlines() if not line.startswith("import time:"))
    return proc, imported


@pytest.mark.parametrize("args", [["--help"], ["status", "--help"], ["monitor", "--help"], ["demo", "--help"],
                                  ["master", "run", "--help"]])
def test_help_does_not_import_torch(tmp_path: Path, args: list[str]) -> None:
    proc, imported = run_fedmq(args, tmp_path)
    assert proc.returncode == 0 and "Usage: " in proc.stdout
    assert "torch" not in imported and "numpy" not in imported


@pytest.mark.parametrize("command, text, fragment", [
    ("master", '[job]\nid = "digits"\n[model]\narch = "mlp"\n[enrollment]\nmode = "opn"\n', "enrollment.mode"),
    ("master", "[job\n", "not valid TOML"),
    ("slave", '[slave]\nid = "s1"\njob = "digits"\n', "slave.key: required"),
])
def test_a_bad_config_is_one_line_and_exit_2_without_torch(tmp_path: Path, command: str, text: str,
                                                         fragment: str) -> None:
    (tmp_path / "bad.toml").write_text(text)
    proc, imported = run_fedmq([command, "run", "-c", "bad.toml"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedmq: error: ") and fragment in lines[0], proc.stderr
    assert "torch" not in imported
