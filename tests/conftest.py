import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "2")
if "PYTEST_XDIST_WORKER" in os.environ:  # `make test`: a worker per core, one thread each (no contention)
    os.environ["OMP_NUM_THREADS"] = "1"


def run_cli(script, args, cwd=ROOT, ok=True, timeout=600, threads=1) -> subprocess.CompletedProcess:
    """Run `python SCRIPT args...` (SCRIPT: a file name in the repo like "ldct_denoise.py", or a path) in
    a subprocess, as a user would. With ok=True a non-zero exit fails the test and shows the tail of both
    streams."""
    path = Path(script) if Path(script).is_absolute() else ROOT / script
    cmd = [sys.executable, str(path), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONHASHSEED": "0", "COLUMNS": "160"}
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if ok:
        assert proc.returncode == 0, f"{cmd}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


class SimulatedKill(Exception):
    """Raised by `killed_at_step` where a kill -9 would land (in-process resume tests; the real SIGKILL test
    is in test_robustness.py)."""


@pytest.fixture
def killed_at_step(monkeypatch):
    """`with killed_at_step(n): train(...)`: training dies when it is about to log step n, i.e. after
    every checkpoint of the earlier steps and before anything of step n is recorded. The context expects the
    death."""
    import contextlib

    from common import runtime

    @contextlib.contextmanager
    def kill(n: int):
        log = runtime.ProgressLogger.log

        def dying(self, step, **scalars):
            if step == n:
                raise SimulatedKill
            return log(self, step, **scalars)

        with monkeypatch.context() as patch, pytest.raises(SimulatedKill):
            patch.setattr(runtime.ProgressLogger, "log", dying)
            yield

    return kill
