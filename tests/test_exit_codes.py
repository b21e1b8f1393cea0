"""Exit statuses the service manager and scripts act on, from real `inspectd` processes: a refused config (exit 2)
is not restarted by the units (`RestartPreventExitStatus=2`), so what `run --check` refuses must end `run` with 2
too, not with 1, which the units retry every RestartSec for ever."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_run_check import _curve_config, _damage

pytestmark = pytest.mark.timeout(180)
REPO = Path(__file__).resolve().parents[1]


def inspectd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "inspectd", *args], capture_output=True, text=True, timeout=120, cwd=REPO
    )


@pytest.mark.parametrize(
    "how", ["missing-secret", "secret-mode-0644", "secret-cut", "allow-list-missing", "secret-in-allow-list"]
)
def test_run_refuses_the_key_material_check_refuses_with_its_line_and_exit_2(tmp_path, pki, how):
    """`run --check` said exit 2 for a missing, world-readable, cut or misplaced key file while `run` exited 1, which
    the units restart: the daemon was refused again every 10 s until someone mended the file."""
    config = _curve_config(tmp_path, pki)
    where, said = _damage(pki, tmp_path, config, how)
    path = tmp_path / "inspectd.yaml"
    path.write_text(yaml.safe_dump(config))
    checked = inspectd("run", "--check", "--config", str(path), "--service-user", "")
    assert checked.returncode == 2 and checked.stderr.startswith(f"inspectd run --check: {where} "), checked.stderr
    ran = inspectd("run", "--config", str(path))
    assert ran.returncode == 2, ran.stderr
    assert ran.stderr.count("\n") == 1 and said in ran.stderr, ran.stderr
    assert ran.stderr.removeprefix("inspectd run: ") == checked.stderr.removeprefix("inspectd run --check: ")
