"""Presets, dotted overrides and their errors."""

import dataclasses
import pathlib
import subprocess
import sys

import jax
import pytest

from jaxlm import config, model
from jaxlm.config import ConfigError


def test_every_preset_loads_and_is_hashable():
    names = config.list_presets()
    assert {"tiny", "125m", "350m", "1b", "7b"} <= set(names)
    for name in names:
        cfg = config.load_preset(name)
        hash(cfg)
        assert cfg.model.num_heads % cfg.model.num_kv_heads == 0


@pytest.mark.parametrize("name,expected", [("125m", 162.2e6), ("1b", 1.236e9), ("7b", 6.738e9)])
def test_preset_parameter_counts(name, expected):
    """Published totals: Llama 3.2 1B has 1.24B parameters, Llama 2 7B 6.74B."""
    cfg = config.load_preset(name).model
    shapes = jax.eval_shape(lambda k: model.init_params(cfg, k), jax.random.key(0))
    assert abs(model.count_params(shapes) / expected - 1) < 2e-3


def test_overrides_parse_types():
    cfg = config.load_config("tiny", ["--model.num_layers=4", "--model.tie_embeddings=true",
                                      "--model.rope_theta=5e5", "--model.attention_impl=cudnn",
                                      "model.head_dim=none", "--mesh.fsdp=2"])
    assert cfg.model.num_layers == 4 and cfg.model.tie_embeddings is True
    assert cfg.model.rope_theta == 500000.0 and cfg.model.attention_impl == "cudnn"
    assert cfg.model.head_dim is None and cfg.mesh.fsdp == 2


def test_override_creates_optional_section():
    cfg = config.load_config("tiny", ["--model.rope_scaling.factor=4"])
    assert cfg.model.rope_scaling == config.RopeScaling(factor=4.0)


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="unknown preset 'huge'.*125m.*tiny"):
        config.load_preset("huge")


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match="unknown config key 'model.num_layer'.*model.num_layers"):
        config.load_config("tiny", ["--model.num_layer=4"])
    with pytest.raises(ConfigError, match="unknown config key 'optimizer.lr'.*model, mesh"):
        config.load_config("tiny", ["--optimizer.lr=1"])


@pytest.mark.parametrize("override,message", [
    ("--model.num_layers=four", "is not a valid int"),
    ("--model.tie_embeddings=maybe", "is not a bool"),
    ("--model.attention_impl=flash", "is not one of xla, cudnn"),
    ("--model.num_kv_heads=4", "must divide model.num_heads=6"),
    ("--model.num_layers", "must look like --section.key=value"),
    ("--model=3", "is a section"),
    ("--model.remat_save=norm,mlp", "unknown mlp; use a comma-separated subset of norm, rope, mlp_hidden"),
])
def test_bad_values_are_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        config.load_config("tiny", [override])


def test_dict_round_trip():
    cfg = config.load_config("1b")
    assert config.from_dict(config.Config, config.to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="unknown keys"):
        config.from_dict(config.ModelConfig, {"hidden": 3})
    assert dataclasses.is_dataclass(cfg.model)


def test_presets_load_from_a_source_checkout_that_is_not_installed(tmp_path):
    """`PYTHONPATH=. python tools/bench_train.py ...` in a checkout that was never installed:
    jaxlm.configs does not exist there (installing maps the top-level configs/ folder to it), so
    the presets load from the folder. `-S` leaves out site-packages and with them any installed
    jaxlm; config.py needs only the standard library."""
    repo = pathlib.Path(__file__).resolve().parent.parent
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from jaxlm import config; "
            "print(','.join(config.list_presets())); print(config.load_preset('1b').model)")
    out = subprocess.run([sys.executable, "-S", "-c", code, str(repo)], cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0].split(",") == config.list_presets()
    assert out[1] == str(config.load_preset("1b").model)
