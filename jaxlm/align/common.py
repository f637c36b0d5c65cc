"""Pieces shared by SFT, DPO and GRPO: tokenized (prompt, response) batches, response log-probs,
masked reductions, and the policy as a train state (load, save, jitted update step).

Batch layout (as in the training loss, jaxlm/loss.py): a (prompt, response) pair becomes one
row of token ids p_0 .. p_{m-1} r_0 .. r_{n-1}; the model reads `input_ids` = row[:-1] and
predicts `labels` = row[1:]; `response_mask` is 1 where the label is a response token. Rows are
right-padded with `PAD_ID` (masked out), so positions are simply 0, 1, ... in every row.

Masked reductions: `masked_mean(x, mask)` = sum(x * mask) / sum(mask) over `axis`, and
`masked_normalize(x, mask, constant)` = sum(x * mask) / constant. NOTE: a slice whose mask is all
zero has mean 0 (not 0/0 = nan): an empty response contributes nothing instead of poisoning the
batch. Masks may be fractional weights.

The policy is a train state {"params", "opt_state", "step", "rng"} exactly as in jaxlm/train.py,
updated by `train.make_train_step` with a post-training loss (`loss_fn`), sharded by
`train.state_shardings` and saved by `checkpoint.CheckpointManager` with its config and
tokenizer, so `python -m jaxlm.decode --run-dir` and `python -m jaxlm.eval --run-dir` read aligned
runs like pretraining runs. Reference and old-policy params are plain pytrees beside it.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxlm import checkpoint, loss, model, optim, train
from jaxlm.checkpoint import CheckpointManager
from jaxlm.config import Config, ModelConfig, TrainConfig

PAD_ID = 0
METRICS_FILE = "metrics.jsonl"


# ---------------------------------------------------------------------------------------------
# Batches


def pack_prompt_and_response_ids(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                                 length: Optional[int] = None) -> dict:
    """Token-id pairs -> {"input_ids", "labels", "response_mask"}, int32/float32 [B, L - 1].

    L = `length` or the longest prompt + response. A pair longer than L is an error.
    """
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses; give one response per prompt")
    longest = max(len(p) + len(r) for p, r in zip(prompt_ids, response_ids))
    length = longest if length is None else length
    if longest > length:
        raise ValueError(f"a prompt + response has {longest} tokens, more than the row length {length}")
    rows = np.full((len(prompt_ids), length), PAD_ID, np.int32)
    is_response = np.zeros((len(prompt_ids), length), np.float32)
    for i, (prompt, response) in enumerate(zip(prompt_ids, response_ids)):
        rows[i, :len(prompt) + len(response)] = list(prompt) + list(response)
        is_response[i, len(prompt):len(prompt) + len(response)] = 1.0
    return {"input_ids": rows[:, :-1], "labels": rows[:, 1:], "response_mask": is_response[:, 1:]}


def tokenize_prompt_and_output(prompts: Sequence[str], outputs: Sequence[str], tokenizer,
                               length: Optional[int] = None) -> dict:
    """Tokenize each prompt and output separately (the output's ids are exactly those trained on)
    and pack them: {"input_ids", "labels", "response_mask"} [B, L - 1] (`pack_prompt_and_response_ids`)."""
    return pack_prompt_and_response_ids([tokenizer.encode(p) for p in prompts],
                                        [tokenizer.encode(o) for o in outputs], length)


# ---------------------------------------------------------------------------------------------
# Log-probs and masked reductions


def entropy(logits: jax.Array) -> jax.Array:
    """Entropy -sum p log p of softmax(logits) over the last dim, in nats, float32.

    Written with log p = log_softmax(logits) term by term (not logsumexp - sum p * logit, which
    cancels badly when the distribution is peaked).
    """
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)


def response_log_probs(cfg: ModelConfig, params: dict, input_ids: jax.Array, labels: jax.Array, *,
                       with_entropy: bool = False) -> dict:
    """{"log_probs": log p(labels | input_ids) [B, T]} (+ "entropy" [B, T]) from `model.forward`."""
    logits, _ = model.forward(cfg, params, input_ids)
    token_loss, _ = loss.cross_entropy(logits, labels)
    out = {"log_probs": -token_loss}
    if with_entropy:
        out["entropy"] = entropy(logits)
    return out


@functools.partial(jax.jit, static_argnums=0)
def response_log_probs_jit(cfg: ModelConfig, params: dict, input_ids: jax.Array, labels: jax.Array) -> jax.Array:
    """Jitted log-probs [B, T] only (old-policy and reference log-probs before an update)."""
    return response_log_probs(cfg, params, input_ids, labels)["log_probs"]


def masked_normalize(x: jax.Array, mask: jax.Array, axis=None, constant: float = 1.0) -> jax.Array:
    """sum(x * mask, axis) / constant (Dr. GRPO's token sum over a constant)."""
    return jnp.sum(jnp.where(mask != 0, x * mask, 0.0), axis=axis) / constant


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """sum(x * mask, axis) / sum(mask, axis); 0 where the mask sums to 0 (see module docstring)."""
    count = jnp.sum(mask, axis=axis)
    return masked_normalize(x, mask, axis) / jnp.where(count == 0, 1.0, count)


# ---------------------------------------------------------------------------------------------
# The policy as a train state


def state_from_params(cfg: Config, mesh: Mesh, params: dict) -> dict:
    """A fresh train state (new optimizer moments, step 0) around a copy of `params`, sharded.

    The copy keeps `params` valid: the train step donates its state.
    """
    tx = optim.make_optimizer(cfg.model, cfg.train)
    shardings = train.state_shardings(cfg, mesh, tx)
    with jax.set_mesh(mesh):
        params = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings["params"])(params)
        opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
    rng = jax.random.key_data(jax.random.key(cfg.train.seed))
    return {"params": params, "opt_state": opt_state,
            "step": jax.device_put(jnp.zeros((), jnp.int32), shardings["step"]),
            "rng": jax.device_put(rng, shardings["rng"])}


def restore_opt_state(run_dir: str, mesh: Mesh):
    """The optimizer state of a run's latest checkpoint, sharded on `mesh`."""
    manager = CheckpointManager(run_dir, async_save=False)
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {run_dir}")
    cfg = manager.restore_config(step)
    cfg = policy_config(cfg.model, mesh, cfg.train)
    state, _, _ = manager.restore(step, train.abstract_state(cfg, mesh, optim.make_optimizer(cfg.model, cfg.train)))
    manager.close()
    return state["opt_state"]


def carry_second_moment(state: dict, source_opt_state) -> dict:
    """`state` with Adam's second moment and step count taken from `source_opt_state`.

    A fresh Adam's first update is lr * sign(g) on every weight (bias-corrected m / sqrt(v) of a
    single gradient); carrying v from the run that trained the params (SFT) scales each weight's
    step by that run's gradient history instead. The first moment stays zero, so the new
    objective's updates start at (1 - beta1) of full size and none of the old run's direction is
    replayed; the learning-rate schedule of the new run is untouched (its own count).
    """
    import optax

    is_adam = lambda node: isinstance(node, optax.ScaleByAdamState)  # noqa: E731
    found = [node for node in jax.tree.leaves(source_opt_state, is_leaf=is_adam) if is_adam(node)]
    if jax.tree.structure(state["opt_state"]) != jax.tree.structure(source_opt_state) or len(found) != 1:
        raise ValueError("cannot carry the optimizer state: the starting run's optimizer differs (clip_norm "
                         "> 0 in one run only, or another parameterization); set carry_adam=false")
    replace = lambda new, old: new._replace(nu=old.nu, count=old.count) if is_adam(new) else new  # noqa: E731
    opt_state = jax.tree.map(replace, state["opt_state"], source_opt_state, is_leaf=is_adam)
    return {**state, "opt_state": opt_state}


def policy_config(model_cfg: ModelConfig, mesh: Mesh, train_cfg: TrainConfig) -> Config:
    """The Config of a post-training run: the policy's model, the mesh, the optimizer settings."""
    from jaxlm.config import MeshConfig

    return Config(model=model_cfg, mesh=MeshConfig(**dict(mesh.shape)), train=train_cfg)


def load_policy(run_dir: Optional[str] = None, hf_dir: Optional[str] = None, mesh: Optional[Mesh] = None,
                dtype: Optional[str] = None):
    """(model config, params sharded on `mesh`, tokenizer or None) of a run directory or HF folder."""
    from jaxlm import hf

    if (run_dir is None) == (hf_dir is None):
        raise ValueError("give exactly one of a run directory (--run-dir / --init) or a Hugging Face folder (--hf)")
    if run_dir is not None:
        return checkpoint.load_run(run_dir, mesh)
    cfg, params = hf.load_pretrained(hf_dir, dtype=dtype, mesh=mesh)
    tokenizer_path = hf_dir if os.path.exists(os.path.join(hf_dir, "tokenizer.json")) else None
    return cfg, params, checkpoint.load_tokenizer(tokenizer_path)


def require_tokenizer(tokenizer, source: str):
    if tokenizer is None:
        raise ValueError(f"{source} has no tokenizer; post-training needs one to read prompts and "
                         "responses as text (train with a tokenizer, or add tokenizer.json to the folder)")
    return tokenizer


def eos_id_of(tokenizer) -> Optional[int]:
    """The end-of-text id: <|endoftext|> of a jaxlm tokenizer, else the HF eos_token_id."""
    special = getattr(tokenizer, "special_ids", None)
    if special and "<|endoftext|>" in special:
        return special["<|endoftext|>"]
    return getattr(tokenizer, "eos_token_id", None)


def save_policy(run_dir: str, step: int, state: dict, cfg: Config, tokenizer, extra: Optional[dict] = None) -> None:
    """Checkpoint `state` in `run_dir` like a training run (config and tokenizer included)."""
    tokenizer_dir = None
    if hasattr(tokenizer, "save") and hasattr(tokenizer, "special_ids"):
        tokenizer_dir = os.path.join(run_dir, "tokenizer")
        tokenizer.save(tokenizer_dir)
    manager = CheckpointManager(run_dir, keep_last=2, async_save=False)
    manager.save(step, state, data_state=extra or {}, config=cfg, tokenizer_dir=tokenizer_dir)
    manager.close()


def add_policy_arguments(parser, required: bool = False):
    """--init / --hf (mutually exclusive; the group is returned for more sources), --mesh, --no-progress."""
    source = parser.add_mutually_exclusive_group(required=required)
    source.add_argument("--init", metavar="RUN_DIR", help="start from this run's latest checkpoint")
    source.add_argument("--hf", metavar="DIR", help="start from a Hugging Face model folder")
    parser.add_argument("--mesh", default="", help="mesh sizes, e.g. data=8 (default: all devices on data)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return source


def append_metrics(run_dir: str, record: dict) -> None:
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, METRICS_FILE), "a", encoding="utf-8") as file:
        file.write(json.dumps(record) + "\n")


def run_update(step_fn, state: dict, batch: dict, mesh: Mesh, grad_accum: int) -> tuple[dict, dict]:
    """One optimizer step on host arrays [N, T]: shard over the mesh, step, fetch the metrics."""
    with jax.set_mesh(mesh):
        state, metrics = step_fn(state, train.shard_batch(batch, mesh, grad_accum))
    return state, jax.device_get(metrics)

