import json
import os
import random

import numpy as np
import pytest
import torch

from common import UserError, files, runtime


def test_atomic_path_keeps_old_file_on_failure(tmp_path):
    # one implementation, torch-free in common.files; runtime re-exports it for the scripts
    assert runtime.atomic_path is files.atomic_path
    assert runtime.refuse_overwrite_input is files.refuse_overwrite_input
    target = tmp_path / "out.bin"
    target.write_bytes(b"good")
    with pytest.raises(RuntimeError), runtime.atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("crash during write")
    assert target.read_bytes() == b"good"
    assert list(tmp_path.iterdir()) == [target]  # no temp file left behind
    with runtime.atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"


def test_atomic_output_gets_the_mode_of_a_plain_open(tmp_path):
    # mkstemp creates 0600 files; an output shared with a colleague must not end up owner-only
    old = os.umask(0o022)
    try:
        (tmp_path / "plain.bin").write_bytes(b"x")
        with files.atomic_path(tmp_path / "atomic.bin") as tmp:
            tmp.write_bytes(b"x")
    finally:
        os.umask(old)
    modes = [(tmp_path / name).stat().st_mode & 0o777 for name in ("plain.bin", "atomic.bin")]
    assert modes == [0o644, 0o644]


def test_checkpoint_round_trip_and_rng(tmp_path):
    runtime.seed_everything(1)
    state = {
        "script": "demo",
        "model": {"w": torch.randn(3)},
        "step": 5,
        "rng": runtime.rng_state(),
        "gen": np.random.default_rng(3).bit_generator.state,
    }
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    runtime.save_checkpoint(tmp_path / "c.pt", state)
    loaded = runtime.load_checkpoint(tmp_path / "c.pt", "demo")
    runtime.set_rng_state(loaded["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    with pytest.raises(UserError, match="written by 'demo'"):
        runtime.load_checkpoint(tmp_path / "c.pt", "other_script")


def test_checkpoint_refuses_garbage_and_pickles(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a loadable checkpoint"):
        runtime.load_checkpoint(tmp_path / "junk.pt")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"script": "x", "obj": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(UserError):  # weights_only=True refuses arbitrary objects
        runtime.load_checkpoint(tmp_path / "evil.pt")


def test_refuse_overwrite_input(tmp_path):
    f = tmp_path / "in.dcm"
    f.write_bytes(b"x")
    with pytest.raises(UserError, match="overwrite the input"):
        runtime.refuse_overwrite_input(tmp_path / "." / "in.dcm", f)
    runtime.refuse_overwrite_input(tmp_path / "out.dcm", f)
    series = tmp_path / "series"
    series.mkdir()
    with pytest.raises(UserError, match="overwrite the input"):  # a DICOM written into the input folder
        files.refuse_overwrite_input(series / "new.dcm", series)
    files.refuse_overwrite_input(series / "preview.png", series)  # only DICOM-like names are refused there


def test_switches_and_devices():
    cpu = torch.device("cpu")
    assert runtime.switch_on("auto", cpu) is False
    assert runtime.switch_on("auto", torch.device("cuda")) is True
    assert runtime.switch_on("on", cpu) is True
    with pytest.raises(UserError):
        runtime.switch_on("sometimes", cpu)
    assert runtime.pick_device("cpu") == cpu
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA"):
            runtime.pick_device("cuda")


def test_progress_logger_and_table(tmp_path, capsys):
    with runtime.ProgressLogger(tmp_path, 4, "train", log_every=2) as progress:
        for step in range(1, 5):
            progress.log(step, loss=1.0 / step)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4] and lines[-1]["loss"] == 0.25
    assert "step 4/4" in (tmp_path / "train.log").read_text()
    runtime.print_metrics_table(
        [{"method": "a", "psnr_db": 30.0}], "t", tmp_path / "m.json", ["window [0, 1]"]
    )
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["rows"][0]["psnr_db"] == 30.0 and saved["notes"] == ["window [0, 1]"]
    assert "psnr_db" in capsys.readouterr().out


def test_prepare_run_dir(tmp_path, root):
    from dataclasses import dataclass

    @dataclass
    class C:
        a: int = 1

    run = runtime.prepare_run_dir(tmp_path / "run", C(), root / "common" / "config.py", ["x", "--y"])
    assert (run / "config.yaml").read_text().strip() == "a: 1"
    assert (run / "command.txt").read_text().strip().endswith("x --y")
    assert (run / "config.py").exists()
