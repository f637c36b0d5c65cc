"""Pretraining: one jitted, sharded train step and the loop around it.

    python -m jaxlm.train                                   # tiny preset on the built-in corpus
    python -m jaxlm.train --config 125m --mesh fsdp=8 --data shards/ --run-dir runs/125m \\
        --train.batch_size=256 --train.grad_accum=4 --model.remat=full

The train state is a plain pytree {"params", "opt_state", "step", "rng"}, float32 throughout
(the master copy); the forward pass casts weights to `model.compute_dtype`. `train_step` is one
`jax.jit` with explicit in/out shardings and the state donated:

    batch [A, B/A, T] --scan over A microbatches--> summed grads --/tokens--> clip --> AdamW

Parallelism comes from shardings alone, on one mesh (data, fsdp, tensor, expert):
- data parallel: the batch is split over `data` (and `fsdp`), params are replicated over `data`;
- FSDP / ZeRO-3: params, grads and Adam moments are sharded over `fsdp` (the `embed` dims);
- ZeRO-1 (`train.zero1`): Adam moments are also sharded over `data` on their largest dim that
  is unsharded and divisible; params stay replicated over `data`;
- tensor parallel: heads / mlp / vocab dims over `tensor` (sharding.py's rules).
docs/design.md gives each one's per-step communication and memory.

A step whose loss or gradient norm is not finite leaves the state unchanged (a select inside the
step); the loop then stops, naming the step, unless `train.skip_nonfinite` allows skipping it.
SIGTERM / SIGINT finish the current step, save a checkpoint and return. A run directory that
holds checkpoints resumes from the latest one, on any mesh. The command line is train_cli.py.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import sys
import threading
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from jaxlm import accounting, loss, model, moe, optim, pipeline, sharding
from jaxlm.checkpoint import CheckpointManager, abstract_like
from jaxlm.config import Config, ConfigError

METRICS_FILE = "metrics.jsonl"


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN/inf more often than `train.skip_nonfinite` allows."""


class OutOfMemoryError(RuntimeError):
    """A train step did not fit in device memory."""


# ---------------------------------------------------------------------------------------------
# State and shardings


def zero1_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """`spec` with `data` added to the largest dim that stays divisible (ZeRO-1 moments)."""
    entries = [() if e is None else (e if isinstance(e, tuple) else (e,)) for e in spec]
    entries += [()] * (len(shape) - len(entries))
    data_size = mesh.shape["data"]
    shards = [math.prod(mesh.shape[axis] for axis in entry) for entry in entries]
    fits = [dim for dim, size in enumerate(shape) if size % (shards[dim] * data_size) == 0]
    if data_size > 1 and fits:
        dim = max(fits, key=lambda d: shape[d] // shards[d])
        entries[dim] = entries[dim] + ("data",)
    return PartitionSpec(*(None if not e else e[0] if len(e) == 1 else e for e in entries))


def _dict_keys(path) -> tuple:
    return tuple(entry.key for entry in path if isinstance(entry, jax.tree_util.DictKey))


def state_shardings(cfg: Config, mesh: Mesh, tx: optax.GradientTransformation) -> dict:
    """NamedShardings of the train state: optimizer leaves shaped like a param follow it."""
    params = model.param_shardings(cfg.model, mesh)
    shapes = jax.eval_shape(lambda: model.init_params(cfg.model, jax.random.key(0)))
    flat_params = {_dict_keys(path): (s, shapes_leaf.shape) for (path, s), shapes_leaf in zip(
        jax.tree.flatten_with_path(params)[0], jax.tree.leaves(shapes))}
    replicated = NamedSharding(mesh, PartitionSpec())

    def opt_sharding(path, leaf):
        match = flat_params.get(_dict_keys(path))
        if match is None or match[1] != leaf.shape:
            return replicated
        if cfg.train.zero1:
            return NamedSharding(mesh, zero1_spec(match[0].spec, leaf.shape, mesh))
        return match[0]

    opt_shapes = jax.eval_shape(tx.init, shapes)
    opt_state = jax.tree.map_with_path(opt_sharding, opt_shapes)
    return {"params": params, "opt_state": opt_state, "step": replicated, "rng": replicated}


def abstract_state(cfg: Config, mesh: Mesh, tx: optax.GradientTransformation) -> dict:
    """ShapeDtypeStructs of the train state with their target shardings (for restoring)."""
    params = jax.eval_shape(lambda: model.init_params(cfg.model, jax.random.key(0)))
    shapes = {"params": params, "opt_state": jax.eval_shape(tx.init, params),
              "step": jax.ShapeDtypeStruct((), jnp.int32),
              "rng": jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))}
    return abstract_like(shapes, state_shardings(cfg, mesh, tx))


def init_state(cfg: Config, mesh: Mesh, tx: optax.GradientTransformation) -> dict:
    """A fresh train state from `train.seed`, created already sharded."""
    shardings = state_shardings(cfg, mesh, tx)
    params_key, rng = jax.random.split(jax.random.key(cfg.train.seed))
    params = model.init_params(cfg.model, params_key, mesh)
    opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
    return {"params": params, "opt_state": opt_state,
            "step": jax.device_put(jnp.zeros((), jnp.int32), shardings["step"]),
            "rng": jax.device_put(jax.random.key_data(rng), shardings["rng"])}


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Microbatched batch leaves [A, B/A, T]: rows over the batch axes (data, fsdp, expert)."""
    return NamedSharding(mesh, sharding.logical_to_spec((None, "batch", "seq")))


def shard_batch(batch: dict, mesh: Mesh, grad_accum: int) -> dict:
    """This process's rows [B_local, T] -> global arrays [A, B/A, T] on the mesh."""
    target = batch_sharding(mesh)
    shards = sharding.batch_shards(mesh)
    out = {}
    for name, array in batch.items():
        rows = array.shape[0] * jax.process_count()
        if rows % (grad_accum * shards):
            raise ConfigError(f"train.batch_size={rows} must be divisible by train.grad_accum={grad_accum} "
                              f"x the data*fsdp*expert mesh size {shards}")
        local = array.reshape(grad_accum, array.shape[0] // grad_accum, *array.shape[1:])
        global_shape = (grad_accum, rows // grad_accum, *array.shape[1:])
        out[name] = jax.make_array_from_process_local_data(target, local, global_shape)
    return out


# ---------------------------------------------------------------------------------------------
# Steps


def router_zeros(cfg) -> dict:
    """Zeros shaped like `model.forward_with_aux`'s aux ({} for a dense model)."""
    if not cfg.num_experts:
        return {}
    layers = len(moe.layer_indices(cfg)[1])
    zeros = {name: jnp.zeros((layers,), jnp.float32) for name in
             ("balance_loss", "router_z_loss", "dropped_fraction", "router_entropy")}
    return {**zeros, "expert_load": jnp.zeros((layers, cfg.num_experts), jnp.float32)}


def update_router_biases(cfg, params: dict, new_params: dict, router: dict) -> dict:
    """Auxiliary-loss-free balancing: the router bias is state, not a trained weight.

    The optimizer's update of it is discarded (it has no gradient; weight decay skips zeros-
    initialized leaves) and replaced by `moe.update_router_bias` on this step's expert load.
    """
    old = params["moe_blocks"]["moe"]["router_bias"]
    bias = moe.update_router_bias(old, router["expert_load"], cfg.moe_bias_update_rate)
    moe_params = {**new_params["moe_blocks"]["moe"], "router_bias": bias}
    return {**new_params, "moe_blocks": {**new_params["moe_blocks"], "moe": moe_params}}


def router_record(router: dict) -> dict:
    """Per-MoE-layer lists for metrics.jsonl: load share per expert, its max/mean, dropped
    fraction, router entropy and the two router losses."""
    if not router:
        return {}
    load = np.asarray(router["expert_load"], np.float64)
    record = {name: [round(float(v), 6) for v in np.asarray(router[name])] for name in
              ("balance_loss", "router_z_loss", "dropped_fraction", "router_entropy")}
    record["expert_load"] = [[round(float(v), 5) for v in row] for row in load]
    record["expert_load_max_over_mean"] = [round(float(row.max() / row.mean()), 4) for row in load]
    return record


@functools.lru_cache(maxsize=32)
def make_train_step(cfg: Config, mesh: Mesh, loss_fn: Optional[Callable] = None) -> Callable:
    """The jitted `(state, batch) -> (state, metrics)`; cached per (config, mesh, loss_fn).

    loss_fn(model_cfg, params, microbatch) -> terms like `loss.loss_terms` ("ce_sum", "z_sum",
    optional "router"), plus optional "sums": scalars summed over microbatches and returned as
    metrics["sums"]. Default: `loss.loss_terms` with train.z_loss. Either way the objective is
    (ce_sum + z_sum) / sum(batch["loss_mask"]) (post-training losses: jaxlm/align).
    """
    tx = optim.make_optimizer(cfg.model, cfg.train)
    shardings = state_shardings(cfg, mesh, tx)
    replicated = NamedSharding(mesh, PartitionSpec())
    terms_fn = loss_fn or (lambda model_cfg, p, micro: loss.loss_terms(model_cfg, p, micro, cfg.train.z_loss))

    def train_step(state, batch):
        params = state["params"]
        count = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)

        def objective(p, micro):
            terms = terms_fn(cfg.model, p, micro)
            return (terms["ce_sum"] + terms["z_sum"]) / count, terms

        grad_fn = jax.value_and_grad(objective, has_aux=True)

        def accumulate(carry, micro):
            (_, terms), grads = grad_fn(params, micro)
            grads = jax.lax.with_sharding_constraint(grads, shardings["params"])
            summed = jax.tree.map(jnp.add, carry[0], grads)
            router = jax.tree.map(jnp.add, carry[3], terms.get("router", {}))
            sums = jax.tree.map(jnp.add, carry[4], terms.get("sums", {}))
            return (summed, carry[1] + terms["ce_sum"], carry[2] + terms["z_sum"], router, sums), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        first = jax.tree.map(lambda x: x[0], batch)
        sums_shape = jax.eval_shape(functools.partial(terms_fn, cfg.model), params, first).get("sums", {})
        carry = (zeros, jnp.float32(0), jnp.float32(0), router_zeros(cfg.model),
                 jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape))
        if cfg.train.grad_accum == 1:
            (grads, ce_sum, z_sum, router, sums), _ = accumulate(carry, first)
        else:
            (grads, ce_sum, z_sum, router, sums), _ = jax.lax.scan(accumulate, carry, batch)
        router = jax.tree.map(lambda x: x / cfg.train.grad_accum, router)
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        rng, _ = jax.random.split(jax.random.wrap_key_data(state["rng"]))
        new_params = optax.apply_updates(params, updates)
        if cfg.model.moe_bias_update_rate > 0:
            new_params = update_router_biases(cfg.model, params, new_params, router)
        new_state = {"params": new_params, "opt_state": opt_state,
                     "step": state["step"] + 1, "rng": jax.random.key_data(rng)}
        total = (ce_sum + z_sum) / count
        finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
        # NOTE: a non-finite step must not touch params or moments; only the step counter moves.
        kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
        kept["step"] = new_state["step"]
        metrics = {"loss": total, "cross_entropy": ce_sum / count, "grad_norm": grad_norm,
                   "lr": optim.learning_rate(cfg.train, state["step"]), "finite": finite,
                   "router": router, "sums": sums}
        return kept, metrics

    data = batch_sharding(mesh)
    return jax.jit(train_step, in_shardings=(shardings, data),
                   out_shardings=(shardings, replicated), donate_argnums=0)


@functools.lru_cache(maxsize=32)
def make_eval_step(cfg: Config, mesh: Mesh) -> Callable:
    """The jitted `(params, batch [A, B/A, T]) -> (cross-entropy sum, token count)`."""
    params = model.param_shardings(cfg.model, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())

    def eval_step(params, batch):
        def one(carry, micro):
            terms = loss.loss_terms(cfg.model, params, micro)
            return (carry[0] + terms["ce_sum"], carry[1] + terms["count"]), None

        (ce_sum, count), _ = jax.lax.scan(one, (jnp.float32(0), jnp.float32(0)), batch)
        return ce_sum, count

    return jax.jit(eval_step, in_shardings=(params, batch_sharding(mesh)),
                   out_shardings=(replicated, replicated))


def device_peak_flops() -> Optional[float]:
    """Dense bf16 peak FLOP/s of device 0 when it is a known accelerator, else None (CPU)."""
    kind = jax.devices()[0].device_kind.lower()
    for name, device in accounting.DEVICES.items():
        if name in kind:
            return device.peak_flops
    return None


def memory_estimate(cfg: Config) -> dict[str, float]:
    """accounting's bytes per device for this run (microbatch B/A), Adam moments under ZeRO-1."""
    train = cfg.train
    parts = accounting.training_memory_per_device(cfg.model, cfg.mesh, train.batch_size // train.grad_accum,
                                                  train.seq_len)
    if train.zero1:
        parts["total"] -= parts["adam_moments"] * (1 - 1 / cfg.mesh.data)
        parts["adam_moments"] /= cfg.mesh.data
    return parts


def format_memory(parts: dict[str, float]) -> str:
    return ", ".join(f"{name} {value / 2**20:.1f} MiB" for name, value in parts.items())


def is_out_of_memory(error: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(error) or "Out of memory" in str(error)


# ---------------------------------------------------------------------------------------------
# The loop


class Trainer:
    """A run: state, data, checkpoints and metrics of one run directory.

    Resumes from the latest checkpoint in `run_dir` when there is one. `train()` runs until
    `train.steps` (or `num_steps` more) and returns this call's metric records.
    """

    def __init__(self, cfg: Config, mesh: Mesh, data: pipeline.TrainData, run_dir: str,
                 tokenizer_dir: Optional[str] = None, progress: bool = True, async_save: bool = True):
        self.cfg, self.mesh, self.data, self.run_dir = cfg, mesh, data, run_dir
        self.tokenizer_dir, self.progress = tokenizer_dir, progress
        os.makedirs(run_dir, exist_ok=True)
        self.tx = optim.make_optimizer(cfg.model, cfg.train)
        self.step_fn = make_train_step(cfg, mesh)
        self.eval_fn = make_eval_step(cfg, mesh)
        self.checkpoints = CheckpointManager(run_dir, cfg.train.keep_last, cfg.train.keep_every, async_save)
        self.data_iterator = data.train_iterator(jax.process_index(), jax.process_count())
        self.eval_data = data.eval_batches(jax.process_index(), jax.process_count())
        self.flops_per_token = accounting.training_flops_per_token(cfg.model, cfg.train.seq_len)
        self.peak_flops = device_peak_flops()
        self.stop_signal: Optional[int] = None
        self.skipped = 0
        self.step = 0
        latest = self.checkpoints.latest_step()
        if latest is None:
            with jax.set_mesh(mesh):
                self.state = init_state(cfg, mesh, self.tx)
        else:
            self.restore(latest)

    def restore(self, step: int) -> None:
        saved = self.checkpoints.restore_config(step)
        if saved.model != self.cfg.model:
            raise ConfigError(f"the checkpoint in {self.run_dir} (step {step}) has model config {saved.model}, "
                              f"not {self.cfg.model}; use a new --run-dir or the same model")
        target = abstract_state(self.cfg, self.mesh, self.tx)
        self.state, data_state, _ = self.checkpoints.restore(step, target)
        self.data_iterator.set_state(data_state)
        self.step = step
        self._truncate_metrics(step)

    def save(self) -> None:
        self.checkpoints.save(self.step, self.state, data_state=self.data_iterator.get_state(),
                              config=self.cfg, tokenizer_dir=self.tokenizer_dir)

    def next_batch(self) -> dict:
        return next(self.data_iterator)

    def evaluate(self) -> Optional[float]:
        """Mean cross-entropy on the held-out batches, or None without a held-out split."""
        if not self.eval_data:
            return None
        ce_sum = count = 0.0
        with jax.set_mesh(self.mesh):
            for batch in self.eval_data:
                terms = self.eval_fn(self.state["params"], shard_batch(batch, self.mesh, self.cfg.train.grad_accum))
                ce_sum, count = ce_sum + float(terms[0]), count + float(terms[1])
        return ce_sum / max(count, 1.0)

    def run_step(self, batch: dict) -> dict:
        try:
            with jax.set_mesh(self.mesh):
                self.state, metrics = self.step_fn(self.state, shard_batch(batch, self.mesh, self.cfg.train.grad_accum))
            return jax.device_get(metrics)
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            raise OutOfMemoryError(
                f"the train step does not fit in device memory. accounting's estimate per device: "
                f"{format_memory(memory_estimate(self.cfg))}. Try --model.remat=full (or save_dots), "
                f"microbatching with --train.grad_accum=N, sharding params with an fsdp mesh axis "
                f"(--mesh fsdp=N), --train.zero1=true, or a smaller --train.batch_size / --train.seq_len"
            ) from error

    def _record(self, metrics: dict, step_time: float) -> dict:
        train = self.cfg.train
        tokens = train.batch_size * train.seq_len
        tokens_per_sec = tokens / step_time
        mfu = None
        if self.peak_flops is not None:
            mfu = accounting.mfu(tokens_per_sec, self.flops_per_token, jax.device_count(), self.peak_flops)
        return {"step": self.step, "loss": float(metrics["loss"]), "lr": float(metrics["lr"]),
                "grad_norm": float(metrics["grad_norm"]), "tokens_per_sec": tokens_per_sec,
                "step_time": step_time, "mfu": mfu, "tokens_seen": self.step * tokens,
                **router_record(metrics.get("router", {}))}

    def _check_finite(self, metrics: dict) -> bool:
        if bool(metrics["finite"]):
            return True
        self.skipped += 1
        if self.skipped > self.cfg.train.skip_nonfinite:
            self.checkpoints.wait()
            latest = self.checkpoints.latest_step()
            kept = f"the last good checkpoint is step {latest}" if latest is not None else "no checkpoint was saved"
            raise NonFiniteLossError(
                f"non-finite loss ({float(metrics['loss'])}) or gradient norm ({float(metrics['grad_norm'])}) at "
                f"step {self.step}; {kept} in {self.run_dir}. Lower --train.lr, raise --train.warmup_steps, or "
                f"allow skipping with --train.skip_nonfinite=N")
        print(f"warning: step {self.step} had a non-finite loss and was skipped "
              f"({self.skipped} of {self.cfg.train.skip_nonfinite} allowed)", file=sys.stderr)
        return False

    def train(self, num_steps: Optional[int] = None) -> list[dict]:
        """Train to `train.steps` (or `num_steps` more steps); returns this call's records."""
        train = self.cfg.train
        last = train.steps if num_steps is None else min(train.steps, self.step + num_steps)
        records = []
        main = jax.process_index() == 0
        bar = tqdm(total=train.steps, initial=self.step, desc="train", disable=not (self.progress and main),
                   dynamic_ncols=True)
        previous = self._install_signal_handlers()
        try:
            while self.step < last:
                start = time.perf_counter()
                metrics = self.run_step(self.next_batch())
                self.step += 1
                record = self._record(metrics, time.perf_counter() - start)
                if not self._check_finite(metrics):
                    record["skipped"] = True
                if self.step % train.eval_every == 0 or self.step == train.steps:
                    eval_loss = self.evaluate()
                    if eval_loss is not None:
                        record.update(eval_loss=eval_loss, perplexity=math.exp(min(eval_loss, 700.0)))
                records.append(record)
                if main:
                    self._append_metrics(record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}")
                if self.step % train.checkpoint_every == 0 or self.step == train.steps or self.stop_signal:
                    self.save()
                if self.stop_signal:
                    print(f"\nreceived signal {self.stop_signal}: saved step {self.step} in {self.run_dir}",
                          file=sys.stderr)
                    break
        finally:
            bar.close()
            self._restore_signal_handlers(previous)
            self.checkpoints.wait()
        return records

    def close(self) -> None:
        self.checkpoints.close()

    # -- signals and metrics file ----------------------------------------------------------

    def request_stop(self, signum: int, frame=None) -> None:
        """Signal handler: finish the current step, save, return. A second signal aborts."""
        if self.stop_signal is not None:
            raise KeyboardInterrupt
        self.stop_signal = signum

    def _install_signal_handlers(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {signum: signal.signal(signum, self.request_stop) for signum in (signal.SIGTERM, signal.SIGINT)}

    @staticmethod
    def _restore_signal_handlers(previous: dict) -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    def _append_metrics(self, record: dict) -> None:
        with open(os.path.join(self.run_dir, METRICS_FILE), "a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")

    def _truncate_metrics(self, step: int) -> None:
        """Drop records of steps after the restored checkpoint (a killed run's tail)."""
        path = os.path.join(self.run_dir, METRICS_FILE)
        if jax.process_index() != 0 or not os.path.isfile(path):
            return
        with open(path, encoding="utf-8") as file:
            lines = [line for line in file if line.strip() and json.loads(line)["step"] <= step]
        with open(path + ".tmp", "w", encoding="utf-8") as file:
            file.writelines(lines)
        os.replace(path + ".tmp", path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m jaxlm.train`: see jaxlm/train_cli.py."""
    from jaxlm import train_cli  # imports this module: not at the top

    return train_cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
