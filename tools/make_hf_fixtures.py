"""Write the tiny Hugging Face checkpoints and reference logits that tests/test_hf.py checks.

Needs transformers and a CPU torch (the tests themselves need neither):

    python tools/make_hf_fixtures.py [--out tests/golden/hf]

For each architecture it builds a tiny random model with transformers, replaces every weight
(norms and biases included) with seeded normal noise, saves it in float32 safetensors under
<out>/<name>/, and writes <name>/reference.npz with fixed input_ids [2, 19] and the logits
transformers computes in float64 with eager attention (stored as float32). Variants:

    llama    GQA (6 heads, 2 kv heads), llama3 rope_scaling, tied embeddings
    mistral  multi-head (6 kv heads), sliding_window 7 < sequence length 19
    qwen2    q/k/v biases
    qwen3    q/k RMSNorm, explicit head_dim 16 != hidden/heads, saved as sharded safetensors

Vocab 202 (= 2 x 101) so the vocab dim splits over a tensor axis of 2. The script checks that
rope scaling and the sliding window really change the logits. Reruns give identical files.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import torch
import transformers

BATCH, SEQ_LEN = 2, 19
COMMON = dict(vocab_size=202, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
              num_key_value_heads=2, intermediate_size=136, max_position_embeddings=256,
              rms_norm_eps=1e-5, tie_word_embeddings=False)
LLAMA3_SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=64)

FIXTURES = {
    "llama": (transformers.LlamaConfig,
              dict(COMMON, rope_theta=10000.0, rope_scaling=LLAMA3_SCALING, tie_word_embeddings=True),
              dict(rope_scaling=None)),
    "mistral": (transformers.MistralConfig,
                dict(COMMON, num_key_value_heads=6, rope_theta=5000.0, sliding_window=7),
                dict(sliding_window=None)),
    "qwen2": (transformers.Qwen2Config, dict(COMMON, rope_theta=10000.0), None),
    "qwen3": (transformers.Qwen3Config, dict(COMMON, rope_theta=20000.0, head_dim=16), None),
}
SHARD_SIZE = {"qwen3": "120KB"}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Replace every parameter with noise: norms around 1, everything else around 0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
            center = 1.0 if name.endswith("norm.weight") else 0.0
            scale = 0.3 if name.endswith(("norm.weight", "bias")) else 0.15
            parameter.copy_(center + scale * noise)


def build(config_class, fields: dict) -> torch.nn.Module:
    config = config_class(**fields)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.to(torch.float32).eval()


def float64_logits(model: torch.nn.Module, input_ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        logits = model.to(torch.float64)(input_ids=torch.from_numpy(input_ids)).logits
    model.to(torch.float32)
    return logits.numpy()


def check_option_matters(config_class, fields, changes, model, input_ids, logits, name) -> None:
    """The same weights without the option must give different logits, or the test is void."""
    plain = build(config_class, dict(fields, **changes))
    plain.load_state_dict(model.state_dict())
    difference = np.abs(float64_logits(plain, input_ids) - logits).max()
    if difference < 1e-3:
        raise RuntimeError(f"{name}: {changes} changes logits by only {difference}")
    print(f"{name}: removing {changes} changes logits by up to {difference:.3f}")


def make_fixture(name: str, seed: int, out: Path) -> None:
    config_class, fields, changes = FIXTURES[name]
    torch.manual_seed(seed)
    model = build(config_class, fields)
    randomize(model, seed)
    input_ids = np.random.default_rng(seed).integers(0, fields["vocab_size"], (BATCH, SEQ_LEN))
    logits = float64_logits(model, input_ids)
    if changes is not None:
        check_option_matters(config_class, fields, changes, model, input_ids, logits, name)
    save_fixture(model, name, input_ids, logits, out, SHARD_SIZE.get(name, "50MB"))


def save_fixture(model, name: str, input_ids: np.ndarray, logits: np.ndarray, out: Path,
                 max_shard_size: str = "50MB") -> None:
    """Write the checkpoint and its reference logits to out/name, replacing what was there."""
    folder = out / name
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    np.savez(folder / "reference.npz", input_ids=input_ids.astype(np.int32),
             logits=logits.astype(np.float32))
    size = sum(file.stat().st_size for file in folder.iterdir())
    print(f"{name}: wrote {folder} ({size / 1024:.0f} KiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "tests/golden/hf")
    args = parser.parse_args()
    for seed, name in enumerate(FIXTURES):
        make_fixture(name, seed, args.out)


if __name__ == "__main__":
    main()
