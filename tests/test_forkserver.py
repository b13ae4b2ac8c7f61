"""The fork server the subprocess tests start their CLI processes from (`tests/_forkserver.py`)
must be indistinguishable from `subprocess.Popen` in what those tests look at: exit status,
stdout, stderr (text, universal newlines), the PID a signal goes to, and the environment."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from _forkserver import SCRIPT, ForkedProcess, spawn
from test_distributed import wait_for


def both(tmp_path, *args, env_extra=None):
    data = tmp_path / "data"  # the script writes its synthetic files there on first use
    env = {**os.environ, "VAELAB_DATA": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    argv = [sys.executable, str(SCRIPT), "--data", str(data), "--n-train", "64", "--n-test", "16", "--", *args]
    real = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    forked = spawn(argv, env=env, cwd=tmp_path)
    assert isinstance(forked, ForkedProcess)
    out, err = forked.communicate(timeout=120)
    return (real.returncode, real.stdout, real.stderr), (forked.returncode, out, err)


def test_a_forked_command_exits_prints_and_sees_its_environment_as_a_real_one(tmp_path):
    real, forked = both(tmp_path, "train", "--nosuch")
    assert real == forked and real[0] == 2 and real[2].startswith("vaelab: error: ")
    real, forked = both(tmp_path, "data", "fetch", "mnist", env_extra={"VAELAB_DATA": str(tmp_path / "elsewhere")})
    assert real == forked and real[0] == 0 and str(tmp_path / "elsewhere") in real[1]


def test_a_forked_command_has_its_own_pid_and_dies_of_the_signal_sent_to_it(tmp_path):
    data = tmp_path / "data"
    marker = tmp_path / "marker"
    env = {**os.environ, "VAELAB_DATA": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    proc = spawn([sys.executable, SCRIPT, "--data", data, "--n-train", "64", "--n-test", "16", "--pause-at-step", "2",
                  "--marker", marker, "--", "train", "ae", "--epochs", "1", "--batch-size", "8", "--quiet",
                  "--out", tmp_path / "run"], env=env)
    assert wait_for(proc, marker) == proc.pid != os.getpid()
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL and proc.poll() == -signal.SIGKILL
