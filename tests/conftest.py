import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


class SimulatedKill(Exception):
    """Raised by `killed_at_step` where a kill -9 would land (in-process resume tests; the real SIGKILL test is in
    test_robustness.py)."""


@pytest.fixture
def killed_at_step(monkeypatch):
    """`with killed_at_step(n): train(...)`: training dies when it is about to log step n, i.e. after every
    checkpoint of the earlier steps and before anything of step n is recorded. The context expects the death."""
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
