"""Runtime plumbing shared by every script: device, seeding, DDP, atomic files, checkpoints, run folders,
progress logging, metric tables and the CLI error boundary."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
import yaml

from common import UserError
from common.config import config_to_dict
from common.files import atomic_path, refuse_overwrite_input  # noqa: F401  (re-exported: scripts use runtime.*)

# --- device, switches, seeding ---


def pick_device(name: str) -> torch.device:
    name = name.lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is available (use --device cpu or auto)")
    if name != "cpu" and not name.startswith("cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, got '{name}'")
    return torch.device(name)


def switch_on(value: str | bool, device: torch.device) -> bool:
    """'auto' means on for CUDA only: on this kind of CPU bf16/compile/channels_last are slower (ENV.md)."""
    if isinstance(value, bool):
        return value
    value = str(value).lower()
    if value not in ("auto", "on", "off", "true", "false"):
        raise UserError(f"config: switch must be auto, on or off, got '{value}'")
    return device.type == "cuda" if value == "auto" else value in ("on", "true")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """RNG states as plain types/tensors so a checkpoint loads with weights_only=True."""
    np_state = np.random.get_state()
    state = {
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npy = state["numpy"]
    np.random.set_state((npy[0], npy[1].numpy().astype(np.uint32), *npy[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def amp_autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --- distributed (torchrun) ---


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> Dist:
    """Single process unless started by torchrun; then gloo on CPU, nccl on CUDA, one GPU per local rank."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Dist(0, 1, 0, pick_device(device_name))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local, device)


def cleanup_distributed() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def ddp_wrap(model: torch.nn.Module, dist: Dist) -> torch.nn.Module:
    if dist.world_size == 1:
        return model
    ids = [dist.device.index] if dist.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


# --- files: atomic writes, checkpoints, run folders ---


def save_checkpoint(path: str | Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path, script: str | None = None) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not a checkpoint we can trust"
        raise UserError(f"{path}: not a loadable checkpoint ({type(exc).__name__})") from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: not a checkpoint of this toolkit")
    if script is not None and state.get("script") != script:
        raise UserError(f"{path}: checkpoint was written by '{state.get('script')}', not by '{script}'")
    return state


def stop_if_not_finite(loss: torch.Tensor, step: int, ckpt_path: str | Path) -> None:
    """The non-finite-loss stop every training loop makes before its update, so no NaN ever reaches the
    weights or a checkpoint. `step` is the number of updates done so far."""
    if not torch.isfinite(loss).all():
        ckpt_path = Path(ckpt_path)
        kept = (
            f"the last good checkpoint is {ckpt_path}" if ckpt_path.is_file() else "no checkpoint was written"
        )
        raise UserError(
            f"non-finite loss ({loss.detach().float().mean().item()}) at step {step + 1}; "
            f"training stopped before the update, {kept} (lower train.lr or check the data)"
        )


def prepare_run_dir(
    out_dir: str | Path, cfg: Any, script_file: str | Path, argv: list[str] | None = None
) -> Path:
    """Every run folder is a record: resolved config, command line and the exact script that ran."""
    run_dir = Path(out_dir)
    if not run_dir.exists():
        _created_run_dirs.append(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file in the way, no permission, read-only disk: say so before any work starts
        raise UserError(f"{run_dir}: cannot create the output folder ({exc.strerror or exc})") from None
    with atomic_path(run_dir / "config.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    with atomic_path(run_dir / "command.txt") as tmp:
        tmp.write_text(" ".join([sys.executable, *(argv if argv is not None else sys.argv)]) + "\n")
    script = Path(script_file)
    with atomic_path(run_dir / script.name) as tmp:
        shutil.copyfile(script, tmp)
    global _warning_log
    _warning_log = run_dir / "train.log"
    return run_dir


# Run folders this process created, and the train.log that warnings are copied to (see cli_main).
_created_run_dirs: list[Path] = []
_warning_log: Path | None = None
_RECORD_ONLY = {"config.yaml", "command.txt", "train.log"}


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as users read them: `warning: <text>` on one line on stderr (and in the run's train.log), not
    Python's `file.py:178: UserWarning:` followed by a source line."""
    text = " ".join(str(message).split())
    print(f"warning: {text}", file=sys.stderr, flush=True)
    if _warning_log is not None and _warning_log.parent.is_dir():
        with open(_warning_log, "a") as fh:
            fh.write(f"warning: {text}\n")


def _remove_unfinished_run_dirs() -> None:
    """A failed command leaves no output folder that holds nothing but its own record (config, command
    line, the script copy): such a folder looks like a result and is not one. Folders that existed before are
    kept."""
    for run_dir in _created_run_dirs:
        if not run_dir.is_dir():
            continue
        names = {p.name for p in run_dir.iterdir()}
        if all(name in _RECORD_ONLY or name.endswith(".py") or name.startswith(".") for name in names):
            shutil.rmtree(run_dir, ignore_errors=True)


# --- progress and metrics ---


class ProgressLogger:
    """Rich bar for people, metrics.jsonl + plain log lines for records (a bar is no record in a log file)."""

    def __init__(
        self,
        run_dir: str | Path | None,
        total_steps: int,
        desc: str,
        enabled: bool = True,
        log_every: int = 10,
        start_step: int = 0,
    ):
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.total, self.desc, self.enabled, self.log_every = total_steps, desc, enabled, max(1, log_every)
        self.start_step, self.progress, self.task = start_step, None, None
        self.t0 = time.perf_counter()

    def __enter__(self):
        if self.enabled and sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
            )
            self.progress.start()
            self.task = self.progress.add_task(
                self.desc, total=self.total, completed=self.start_step, info=""
            )
        return self

    def log(self, step: int, **scalars: float) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.t0
        rate = (step - self.start_step) / elapsed if elapsed > 0 else 0.0
        record = {"step": step, "time_s": round(elapsed, 3), **{k: _plain(v) for k, v in scalars.items()}}
        info = " ".join(f"{k}={_fmt(v)}" for k, v in scalars.items()) + f" {rate:.2f} it/s"
        if rate > 0 and step < self.total:
            info += f" eta {format_duration((self.total - step) / rate)}"
        if self.run_dir is not None:
            with open(self.run_dir / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")
        if self.progress is not None:
            self.progress.update(self.task, completed=step, info=info)
        if step % self.log_every == 0 or step == self.total:
            line = f"{self.desc} step {step}/{self.total} {info}"
            if self.run_dir is not None:
                with open(self.run_dir / "train.log", "a") as fh:
                    fh.write(line + "\n")
            if self.progress is None:
                print(line, flush=True)

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.stop()
        return False


def format_duration(seconds: float) -> str:
    """3725 -> '1h02m', 125 -> '2m05s', 9.3 -> '9s': a time left that people read at a glance."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, (np.floating, np.integer)):
        v = v.item()
    return v


def _fmt(v: Any) -> str:
    v = _plain(v)
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


def print_metrics_table(
    rows: list[dict], title: str, json_path: str | Path | None = None, notes: list[str] | tuple = ()
) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = [{k: _plain(v) for k, v in row.items()} for row in rows]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="left" if col in ("method", "name", "row") else "right")
    for row in rows:
        table.add_row(*[_fmt(row[c]) if c in row and row[c] is not None else "-" for c in columns])
    console = Console(width=max(100, len(columns) * 14))
    console.print(table)
    for note in notes:
        console.print(f"  {note}")
    if json_path is not None:
        with atomic_path(json_path) as tmp:
            tmp.write_text(json.dumps({"title": title, "rows": rows, "notes": list(notes)}, indent=2))


# --- CLI error boundary ---


def cli_main(app) -> None:
    """Run a Typer app; a UserError becomes one line on stderr and exit code 2, never a traceback.
    Typer itself (standalone mode) handles usage errors and exit codes. Warnings print as one line."""
    warnings.showwarning = _one_line_warning
    try:
        app()
    except UserError as exc:
        _remove_unfinished_run_dirs()
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as exc:  # disk full, permission denied mid-run: the file and the reason, not a traceback
        _remove_unfinished_run_dirs()
        print(f"error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        sys.exit(1)
    except SystemExit as exc:  # typer's standalone mode exits through here, failures included
        if exc.code not in (0, None):
            _remove_unfinished_run_dirs()
        raise
    finally:
        cleanup_distributed()
