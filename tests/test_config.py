from dataclasses import dataclass, field

import pytest
import yaml

from common import UserError
from common.config import config_from_dict, config_to_dict, default_config_path, load_config


@dataclass
class Train:
    lr: float = 1e-3
    steps: int = 10
    amp: str = "auto"
    flag: bool = False
    mults: list[int] = field(default_factory=lambda: [1, 2])
    window: tuple[float, float] = (-160.0, 240.0)
    path: str | None = None


@dataclass
class Cfg:
    train: Train = field(default_factory=Train)


def write(tmp_path, content):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(content))
    return p


def test_precedence_defaults_preset_overrides(tmp_path):
    p = write(
        tmp_path,
        {
            "defaults": {"train": {"lr": "1e-4", "steps": 100}},
            "presets": {"full": {}, "tiny": {"train": {"steps": 5, "mults": [1]}}},
        },
    )
    assert load_config(Cfg, p, "full", []).train.lr == 1e-4  # YAML reads 1e-4 as a string: converted
    tiny = load_config(Cfg, p, "tiny", ["train.steps=7", "train.flag=true", "train.window=[-1000, 1000]"])
    assert (tiny.train.steps, tiny.train.mults, tiny.train.flag) == (7, [1], True)
    assert tiny.train.window == (-1000.0, 1000.0) and isinstance(tiny.train.lr, float)
    assert load_config(Cfg, p, "tiny", ["train.path=/data/x"]).train.path == "/data/x"
    assert load_config(Cfg, p, "tiny", ["train.path=null"]).train.path is None


@pytest.mark.parametrize(
    "override, message",
    [
        (["train.nope=1"], "unknown key 'train.nope'"),
        (["nosection.lr=1"], "unknown key 'nosection'"),
        (["train.steps=abc"], "not a valid int"),
        (["train.steps=1.5"], "not a valid int"),
        (["train.flag=maybe"], "not a valid bool"),
        (["train.lr"], "section.key=value"),
    ],
)
def test_bad_overrides_are_clear_errors(tmp_path, override, message):
    p = write(tmp_path, {"defaults": {}, "presets": {"full": {}}})
    with pytest.raises(UserError, match=message):
        load_config(Cfg, p, "full", override)


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="unknown preset"):
        load_config(Cfg, write(tmp_path, {"defaults": {}, "presets": {"full": {}}}), "huge", [])
    with pytest.raises(UserError, match="unknown key"):
        load_config(Cfg, write(tmp_path, {"defaults": {"train": {"typo": 1}}}), None, [])
    with pytest.raises(UserError, match="not valid YAML"):
        bad = tmp_path / "bad.yaml"
        bad.write_text("defaults: [unclosed")
        load_config(Cfg, bad, None, [])
    with pytest.raises(UserError, match="not found"):
        load_config(Cfg, tmp_path / "missing.yaml", None, [])


def test_round_trip_and_default_path(tmp_path, root):
    cfg = load_config(Cfg, None, None, ["train.steps=3"])
    assert config_from_dict(Cfg, config_to_dict(cfg)) == cfg
    assert default_config_path(root / "ldct_denoise.py") == root / "configs" / "ldct_denoise.yaml"


def test_every_shipped_config_loads_all_presets(root):
    """Each script's YAML must load with its own dataclass for every preset (catches typos in configs)."""
    import importlib

    for path in sorted((root / "configs").glob("*.yaml")):
        module = importlib.import_module(path.stem)
        presets = yaml.safe_load(path.read_text()).get("presets", {})
        for preset in presets:
            load_config(module.Config, path, preset, [])
