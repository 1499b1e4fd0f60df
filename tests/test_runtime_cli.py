"""The CLI boundary in common/runtime.py: one-line warnings (also in train.log), no record-only output folder
after a failure, the non-finite-loss stop, and the ETA in progress lines."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from common import UserError, runtime

ROOT = Path(__file__).resolve().parents[1]

APP = textwrap.dedent(
    """
    import sys, warnings
    from dataclasses import dataclass
    from pathlib import Path
    import typer
    sys.path.insert(0, {root!r})
    from common import UserError, runtime

    app = typer.Typer(add_completion=False)

    @dataclass
    class Config:
        seed: int = 0

    @app.command()
    def run(out: Path, fail: bool = False, steps: int = 0):
        runtime.prepare_run_dir(out, Config(), __file__, sys.argv)
        warnings.warn("input.nii: sheared affine; the output keeps it as read")
        with runtime.ProgressLogger(out, max(steps, 1), "train", log_every=1) as progress:
            for step in range(1, steps + 1):
                progress.log(step, loss=1.0 / step)
        if fail:
            raise UserError("bad input: nothing to do")

    @app.command()
    def other():
        pass

    if __name__ == "__main__":
        runtime.cli_main(app)
    """
)


def run_app(tmp_path, *args):
    script = tmp_path / "app.py"
    script.write_text(APP.format(root=str(ROOT)))
    return subprocess.run(
        [sys.executable, str(script), "run", *map(str, args)], capture_output=True, text=True
    )


def test_warning_is_one_line_on_stderr_and_in_train_log(tmp_path):
    proc = run_app(tmp_path, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == ["warning: input.nii: sheared affine; the output keeps it as read"]
    assert "warning: input.nii: sheared affine" in (tmp_path / "out" / "train.log").read_text()


def test_failed_command_leaves_no_record_only_folder(tmp_path):
    proc = run_app(tmp_path, tmp_path / "out", "--fail")
    assert proc.returncode == 2 and proc.stderr.splitlines()[-1] == "error: bad input: nothing to do"
    assert not (tmp_path / "out").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    proc = run_app(tmp_path, existing, "--fail")
    assert proc.returncode == 2 and existing.is_dir()  # a folder the user already had is never removed
    proc = run_app(tmp_path, tmp_path / "trained", "--fail", "--steps", "3")
    assert (
        proc.returncode == 2 and (tmp_path / "trained" / "metrics.jsonl").is_file()
    )  # a record of real work


def test_progress_lines_carry_an_eta(tmp_path):
    run_app(tmp_path, tmp_path / "out", "--steps", "3")
    log = (tmp_path / "out" / "train.log").read_text()
    assert "eta " in log.splitlines()[1] and "train step 3/3" in log


def test_stop_if_not_finite(tmp_path):
    runtime.stop_if_not_finite(torch.tensor(1.0), 0, tmp_path / "c.pt")
    with pytest.raises(UserError, match="non-finite loss .* at step 5; .*no checkpoint was written"):
        runtime.stop_if_not_finite(torch.tensor(float("nan")), 4, tmp_path / "c.pt")
    (tmp_path / "c.pt").write_bytes(b"x")
    with pytest.raises(UserError, match="last good checkpoint is"):
        runtime.stop_if_not_finite(torch.tensor([1.0, float("inf")]), 4, tmp_path / "c.pt")


def test_format_duration():
    assert [runtime.format_duration(s) for s in (9.3, 125, 3725)] == ["9s", "2m05s", "1h02m"]
