"""The fork server the subprocess tests start their CLI processes from (`tests/_forkserver.py`)
must be indistinguishable from `subprocess.Popen` in what those tests look at: exit status,
stdout, stderr (text, universal newlines), the PID a signal goes to, and the environment; and
the processes torchrun starts through its proxy must stand and fall with that proxy."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _forkserver import SCRIPT, ForkedProcess, spawn
from test_distributed import wait_for

pytestmark = pytest.mark.skipif(bool(os.environ.get("VAELAB_TEST_NO_FORKSERVER")),
                                reason="VAELAB_TEST_NO_FORKSERVER is set: no fork server to test")


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


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and parent(int(entry.name)) == pid:
                found.append(int(entry.name))
        except (OSError, IndexError):  # gone meanwhile
            pass
    return found


def test_torchrun_s_processes_are_forked_and_die_with_their_proxy(tmp_path):
    """`train --nproc 2`: process 1 is forked by the server (not started by torchrun's proxy); a
    SIGKILL to its proxy kills it, and torchrun ends the job as for a killed process."""
    marker = tmp_path / "marker"
    env = {**os.environ, "VAELAB_DATA": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"}
    proc = spawn([sys.executable, SCRIPT, "--data", tmp_path / "data", "--n-train", "64", "--n-test", "16",
                  "--no-figures", "--pause-at-step", "1", "--pause-rank", "1", "--marker", marker, "--",
                  "train", "ae", "--epochs", "1", "--batch-size", "8", "--quiet", "--nproc", "2",
                  "--out", tmp_path / "run"], env=env)
    worker = wait_for(proc, marker)
    proxies = children(proc.pid)  # torchrun's agent runs in the command itself
    assert len(proxies) == 2 and parent(worker) not in proxies
    assert "_forkserver.py" in Path(f"/proc/{parent(worker)}/cmdline").read_text()
    proxy = next(p for p in proxies if "RANK=1" in Path(f"/proc/{p}/environ").read_text().split("\0"))
    os.kill(proxy, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{worker}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{worker}").exists(), "the command outlived its proxy"
    assert proc.wait(timeout=60) != 0  # torchrun ended the job
