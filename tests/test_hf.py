"""Hugging Face interop: logits equal transformers' and checkpoints round-trip bit for bit.

The fixtures in tests/golden/hf/ are tiny random models written by tools/make_hf_fixtures.py with
transformers, with transformers' float64 logits; these tests need neither torch nor transformers.
Logit tolerance: max absolute error 1e-4 (the logits are of order 1 to 5; float32 jaxlm against
the float64 reference differs by a few 1e-6).
"""

import json
import shutil
import struct
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from jaxlm import convert, hf, model, safetensors_io, sharding

FIXTURES = Path(__file__).parent / "golden" / "hf"
NAMES = ["llama", "mistral", "qwen2", "qwen3"]
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
TOLERANCE = 1e-4

forward = jax.jit(model.forward, static_argnums=0)


def reference(name: str) -> dict:
    return dict(np.load(FIXTURES / name / "reference.npz"))


def read_tensors(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of a folder, read by the safetensors library itself (float32 files only)."""
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(safetensors.numpy.load_file(file))
    return tensors


def copy_fixture(name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def max_logit_error(cfg, params, name: str) -> float:
    expected = reference(name)
    logits, _ = forward(cfg, params, expected["input_ids"])
    return float(np.abs(np.asarray(logits) - expected["logits"]).max())


def assert_trees_identical(left, right) -> None:
    assert jax.tree.structure(left) == jax.tree.structure(right)
    for a, b in zip(jax.tree.leaves(left), jax.tree.leaves(right)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def assert_tensors_identical(left: dict, right: dict) -> None:
    assert sorted(left) == sorted(right)
    for name in left:
        assert left[name].dtype == right[name].dtype, name
        np.testing.assert_array_equal(left[name], right[name], err_msg=name)


# ---------------------------------------------------------------------------------------------
# Parity and round trips


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(name):
    cfg, params = hf.load_pretrained(FIXTURES / name)
    assert cfg.compute_dtype == "float32" and cfg.param_dtype == "float32"
    error = max_logit_error(cfg, params, name)
    print(f"{name}: max |logits - transformers| = {error:.2e}")
    assert error < TOLERANCE


def test_options_are_read():
    assert hf.load_pretrained(FIXTURES / "llama")[0].rope_scaling.original_max_seq_len == 64
    assert hf.load_pretrained(FIXTURES / "llama")[0].tie_embeddings
    assert hf.load_pretrained(FIXTURES / "mistral")[0].sliding_window == 7
    assert hf.load_pretrained(FIXTURES / "qwen2")[0].qkv_bias
    qwen3 = hf.load_pretrained(FIXTURES / "qwen3")[0]
    assert qwen3.qk_norm and qwen3.resolved_head_dim == 16


@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip(name, tmp_path):
    cfg, params = hf.load_pretrained(FIXTURES / name)
    hf.save_pretrained(cfg, params, tmp_path / "saved")
    saved_config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved_config["architectures"] == [ARCHITECTURES[name]]
    assert saved_config["torch_dtype"] == "float32"
    reloaded_cfg, reloaded = hf.load_pretrained(tmp_path / "saved")
    assert reloaded_cfg == cfg
    assert_trees_identical(params, reloaded)
    assert_tensors_identical(read_tensors(tmp_path / "saved"), read_tensors(FIXTURES / name))


def test_sharded_save(tmp_path):
    cfg, params = hf.load_pretrained(FIXTURES / "qwen2")
    hf.save_pretrained(cfg, params, tmp_path / "saved", max_shard_bytes=100_000)
    index = json.loads((tmp_path / "saved" / hf.INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files == sorted(p.name for p in (tmp_path / "saved").glob("*.safetensors"))
    assert_trees_identical(params, hf.load_pretrained(tmp_path / "saved")[1])
    assert_tensors_identical(read_tensors(tmp_path / "saved"), read_tensors(FIXTURES / "qwen2"))


@pytest.mark.parametrize("name", NAMES)
def test_load_onto_mesh(name):
    mesh = sharding.make_mesh("fsdp=2,tensor=2", devices=jax.devices()[:4])
    cfg, params = hf.load_pretrained(FIXTURES / name, mesh=mesh)
    expected = model.param_shardings(cfg, mesh)
    for leaf, leaf_sharding in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
        assert leaf.sharding == leaf_sharding
    with jax.set_mesh(mesh):
        error = max_logit_error(cfg, params, name)
    assert error < TOLERANCE


def write_bfloat16_safetensors(file: Path, tensors: dict[str, np.ndarray]) -> None:
    """An independent minimal writer (not jaxlm's) of bf16 safetensors."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, array in tensors.items():
        header[name] = {"dtype": "BF16", "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    encoded = json.dumps(header).encode()
    with open(file, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)) + encoded)
        for array in tensors.values():
            handle.write(array.tobytes())


def test_bfloat16_checkpoint(tmp_path):
    folder = copy_fixture("llama", tmp_path)
    original = read_tensors(folder)
    rounded = {name: array.astype(ml_dtypes.bfloat16) for name, array in original.items()}
    write_bfloat16_safetensors(folder / "model.safetensors", rounded)
    edit_config(folder, dtype="bfloat16")
    cfg, params = hf.load_pretrained(folder)
    assert cfg.param_dtype == "bfloat16" and cfg.compute_dtype == "float32"
    cfg32, params32 = hf.load_pretrained(FIXTURES / "llama")
    expected = jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16), params32)
    assert_trees_identical(params, expected)
    upcast_cfg, upcast = hf.load_pretrained(folder, dtype="float32")
    assert upcast_cfg.param_dtype == "float32"
    assert_trees_identical(upcast, jax.tree.map(lambda x: x.astype(np.float32), expected))
    hf.save_pretrained(cfg, params, tmp_path / "saved")
    _, header = safetensors_io.read_safetensors_header(tmp_path / "saved" / "model.safetensors")
    assert header["model.norm.weight"]["dtype"] == "BF16"
    assert_trees_identical(hf.load_pretrained(tmp_path / "saved")[1], params)


# ---------------------------------------------------------------------------------------------
# Errors


def test_unsupported_architecture(tmp_path):
    folder = copy_fixture("llama", tmp_path)
    edit_config(folder, architectures=["GPT2LMHeadModel"])
    with pytest.raises(hf.CheckpointError, match="GPT2LMHeadModel.*supports LlamaForCausalLM"):
        hf.load_pretrained(folder)


@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
def test_unsupported_rope_scaling(tmp_path, key):
    folder = copy_fixture("llama", tmp_path)
    edit_config(folder, **{"rope_parameters": None, key: {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(hf.CheckpointError, match="rope_scaling type 'yarn' is not supported"):
        hf.load_pretrained(folder)


def test_unsupported_option(tmp_path):
    folder = copy_fixture("llama", tmp_path)
    edit_config(folder, attention_bias=True)
    with pytest.raises(hf.CheckpointError, match="attention_bias"):
        hf.load_pretrained(folder)


def test_missing_tensor(tmp_path):
    folder = copy_fixture("mistral", tmp_path)
    tensors = read_tensors(folder)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    safetensors.numpy.save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    missing = r"'model\.layers\.1\.mlp\.up_proj\.weight'.*missing; searched model\.safetensors"
    with pytest.raises(hf.CheckpointError, match=missing):
        hf.load_pretrained(folder)


def test_unexpected_tensor(tmp_path):
    folder = copy_fixture("mistral", tmp_path)
    tensors = read_tensors(folder)
    tensors["model.layers.0.self_attn.o_proj.bias"] = np.ones(48, np.float32)
    safetensors.numpy.save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(hf.CheckpointError, match=r"unexpected .*o_proj\.bias"):
        hf.load_pretrained(folder)


def test_shape_mismatch(tmp_path):
    folder = copy_fixture("qwen2", tmp_path)
    edit_config(folder, intermediate_size=140)
    mismatch = r"down_proj\.weight' has shape \(48, 136\) but the config expects \(48, 140\)"
    with pytest.raises(hf.CheckpointError, match=mismatch):
        hf.load_pretrained(folder)


def test_save_errors(tmp_path, monkeypatch):
    cfg, params = hf.load_pretrained(FIXTURES / "qwen2")
    with pytest.raises(hf.CheckpointError, match="LlamaForCausalLM cannot have model.qkv_bias"):
        hf.save_pretrained(cfg, params, tmp_path / "llama", architecture="LlamaForCausalLM")
    with pytest.raises(FileExistsError, match="already exists"):
        hf.save_pretrained(cfg, params, tmp_path)

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(hf, "write_safetensors", fail)
    with pytest.raises(OSError, match="disk full"):
        hf.save_pretrained(cfg, params, tmp_path / "half")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Command line


def test_cli_round_trip(tmp_path):
    assert convert.main(["hf-to-jaxlm", str(FIXTURES / "qwen3"), str(tmp_path / "jaxlm")]) == 0
    cfg, params = convert.load_checkpoint(tmp_path / "jaxlm")
    assert cfg.model == hf.load_pretrained(FIXTURES / "qwen3")[0]
    assert convert.main(["jaxlm-to-hf", str(tmp_path / "jaxlm"), str(tmp_path / "hf"),
                         "--max-shard-size", "120KB"]) == 0
    assert_tensors_identical(read_tensors(tmp_path / "hf"), read_tensors(FIXTURES / "qwen3"))
    assert (tmp_path / "hf" / hf.INDEX_FILE).exists()


def test_cli_keeps_mistral_without_window(tmp_path):
    folder = copy_fixture("mistral", tmp_path)
    edit_config(folder, sliding_window=None)
    convert.main(["hf-to-jaxlm", str(folder), str(tmp_path / "jaxlm")])
    convert.main(["jaxlm-to-hf", str(tmp_path / "jaxlm"), str(tmp_path / "hf")])
    saved_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert saved_config["architectures"] == ["MistralForCausalLM"]
    assert saved_config["sliding_window"] is None


def test_cli_help_and_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        convert.main(["--help"])
    assert exit_info.value.code == 0
    assert "hf-to-jaxlm" in capsys.readouterr().out
    folder = copy_fixture("llama", tmp_path)
    edit_config(folder, architectures=["GPT2LMHeadModel"])
    assert convert.main(["hf-to-jaxlm", str(folder), str(tmp_path / "out")]) == 1
    assert "GPT2LMHeadModel" in capsys.readouterr().err
