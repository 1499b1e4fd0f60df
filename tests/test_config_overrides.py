"""`--config` with partial override files (issue 16.4): flat sections over the shipped config and the preset,
repeatable (later wins), `--set` last; full files keep working and may omit `presets`."""

from dataclasses import dataclass, field

import pytest
import yaml

from common import UserError
from common.config import load_config


@dataclass
class Train:
    lr: float = 1e-3
    steps: int = 10
    batch: int = 4


@dataclass
class Model:
    width: int = 64


@dataclass
class Cfg:
    train: Train = field(default_factory=Train)
    model: Model = field(default_factory=Model)


@pytest.fixture
def shipped(tmp_path):
    path = tmp_path / "shipped.yaml"
    content = {
        "defaults": {"train": {"lr": "1e-4", "steps": 100}, "model": {"width": 128}},
        "presets": {"full": {}, "tiny": {"train": {"steps": 5}, "model": {"width": 8}}},
    }
    path.write_text(yaml.safe_dump(content))
    return path


def write(tmp_path, name, content) -> str:
    path = tmp_path / name
    path.write_text(content)
    return path


def test_partial_file_applies_over_shipped_and_preset(tmp_path, shipped):
    lr = write(tmp_path, "lr.yaml", "train: {lr: 2.0e-6}\n")
    cfg = load_config(Cfg, [lr], "tiny", [], shipped=shipped)
    assert (cfg.train.lr, cfg.train.steps, cfg.model.width) == (2e-6, 5, 8)
    cfg = load_config(Cfg, lr, None, [], shipped=shipped)  # a single path works too
    assert (cfg.train.lr, cfg.train.steps, cfg.model.width) == (2e-6, 100, 128)


def test_later_files_win_and_set_applies_last(tmp_path, shipped):
    first = write(tmp_path, "a.yaml", "train: {lr: 1.0e-5, batch: 2}\n")
    second = write(tmp_path, "b.yaml", "train: {lr: 3.0e-5}\n")
    cfg = load_config(Cfg, [first, second], "full", ["train.batch=16"], shipped=shipped)
    assert (cfg.train.lr, cfg.train.batch) == (3e-5, 16)
    cfg = load_config(Cfg, [second, first], "full", [], shipped=shipped)
    assert (cfg.train.lr, cfg.train.batch) == (1e-5, 2)


def test_full_file_without_presets_still_takes_shipped_presets(tmp_path, shipped):
    user = write(tmp_path, "user.yaml", "defaults:\n  train: {batch: 7}\n")
    cfg = load_config(Cfg, [user], "tiny", [], shipped=shipped)
    assert (cfg.train.batch, cfg.train.steps, cfg.train.lr) == (7, 5, 1e-4)


def test_full_file_alone_still_works_without_shipped(shipped):
    cfg = load_config(Cfg, shipped, "tiny", [])
    assert (cfg.train.steps, cfg.model.width) == (5, 8)


def test_partial_file_errors_name_the_file(tmp_path, shipped):
    typo = write(tmp_path, "typo.yaml", "train: {lrr: 1.0}\n")
    with pytest.raises(UserError, match=r"typo\.yaml.*unknown key 'train\.lrr'"):
        load_config(Cfg, [typo], "tiny", [], shipped=shipped)
    bad = write(tmp_path, "bad.yaml", "train: {steps: many}\n")
    with pytest.raises(UserError, match=r"bad\.yaml.*train\.steps"):
        load_config(Cfg, [bad], None, [], shipped=shipped)
    mixed = write(tmp_path, "mixed.yaml", "defaults: {}\ntrain: {lr: 1.0}\n")
    with pytest.raises(UserError, match="mixes"):
        load_config(Cfg, [mixed], None, [], shipped=shipped)
    with pytest.raises(UserError, match="unknown preset 'huge'.*known: full, tiny"):
        load_config(Cfg, [], "huge", [], shipped=shipped)
    with pytest.raises(UserError, match="file not found"):
        load_config(Cfg, [tmp_path / "missing.yaml"], None, [], shipped=shipped)
