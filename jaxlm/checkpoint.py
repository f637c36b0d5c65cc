"""Training checkpoints: an orbax CheckpointManager over `<run_dir>/checkpoints/<step>/`.

Each step directory holds four items:
    state/      the train state pytree (params, optimizer state, step, rng), orbax
                StandardCheckpointer format: each array in its own zarr/OCDBT entry
    data/       the data iterator state (JSON), so the stream resumes at the next batch
    config/     the resolved `Config` (JSON, `config.to_dict`)
    tokenizer/  the tokenizer's JSON (when the run has one), so a checkpoint is self-contained

Policy: saves are asynchronous (the step loop goes on while arrays are written); the last
`keep_last` checkpoints are kept, plus every step divisible by `keep_every`.

Atomicity: orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it to `<step>`
only once every item is written (and, on several hosts, every host is done). A process killed
mid-save leaves a temporary directory that `latest_step` ignores, so the previous checkpoint
stays the one restored.

Resharding: `restore` takes an abstract state whose leaves carry the target `NamedSharding`s;
orbax reads each device's slice directly, so a run saved on one mesh resumes on another.

For inference, `load_run(run_dir)` gives the latest checkpoint's model config, params and
tokenizer (decoding, alignment, perplexity filtering).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from jaxlm.config import Config, from_dict, to_dict

CHECKPOINT_DIR = "checkpoints"


class CheckpointManager:
    """Save and restore train states of one run directory."""

    def __init__(self, run_dir: str | os.PathLike, keep_last: int = 3, keep_every: Optional[int] = None,
                 async_save: bool = True):
        self.directory = Path(run_dir).absolute() / CHECKPOINT_DIR
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep_last, keep_period=keep_every, create=True,
            enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, *, data_state: dict, config: Config,
             tokenizer_dir: Optional[str] = None) -> bool:
        """Start saving `state` at `step` (returns at once when async); False if it already exists."""
        if step in self.manager.all_steps():
            return False
        items = {
            "state": ocp.args.StandardSave(state),
            "data": ocp.args.JsonSave(data_state),
            "config": ocp.args.JsonSave(to_dict(config)),
        }
        if tokenizer_dir is not None:
            with open(os.path.join(tokenizer_dir, "tokenizer.json"), encoding="utf-8") as file:
                items["tokenizer"] = ocp.args.JsonSave(json.load(file))
        return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, Config]:
        """(state, data iterator state, config) of `step`, the state placed as `abstract_state`.

        `abstract_state`: a pytree of `jax.ShapeDtypeStruct` with target shardings.
        """
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore()))
        return restored["state"], restored["data"], from_dict(Config, restored["config"])

    def restore_config(self, step: int) -> Config:
        restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return from_dict(Config, restored["config"])

    def restore_tokenizer(self, step: int, directory: str | os.PathLike) -> Optional[str]:
        """Write the checkpoint's tokenizer.json into `directory`; None if it has none."""
        if not (self.directory / str(step) / "tokenizer").exists():
            return None
        restored = self.manager.restore(step, args=ocp.args.Composite(tokenizer=ocp.args.JsonRestore()))
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "tokenizer.json"), "w", encoding="utf-8") as file:
            json.dump(restored["tokenizer"], file, ensure_ascii=False)
        return os.fspath(directory)

    def wait(self) -> None:
        """Block until pending asynchronous saves are committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree`'s leaves (arrays or ShapeDtypeStructs) with `shardings`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def load_run(run_dir: str, mesh: Optional[Mesh] = None):
    """(model config, params, tokenizer or None) of the latest checkpoint of a training run,
    for inference: the params on `mesh` (default: one device)."""
    from jaxlm import optim, sharding, train  # train imports this module: not at the top

    manager = CheckpointManager(run_dir, async_save=False)
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {run_dir}; train with python -m jaxlm.train "
                                f"--run-dir {run_dir}")
    cfg = manager.restore_config(step)
    mesh = mesh or sharding.make_mesh("data=1", jax.devices()[:1])
    target = train.abstract_state(cfg, mesh, optim.make_optimizer(cfg.model, cfg.train))
    state, _, _ = manager.restore(step, target)
    with tempfile.TemporaryDirectory() as directory:
        tokenizer = load_tokenizer(manager.restore_tokenizer(step, directory))
    manager.close()
    return cfg.model, state["params"], tokenizer


def load_tokenizer(directory: Optional[str]):
    """A jaxlm Tokenizer saved in `directory`, else a Hugging Face tokenizer.json there (with
    transformers installed), else None (the caller works in token ids)."""
    if directory is None:
        return None
    from jaxlm.tokenizer import Tokenizer

    try:
        return Tokenizer.load(directory)
    except (FileNotFoundError, ValueError):
        pass
    try:  # a Hugging Face tokenizer.json, if transformers is installed
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(directory)
    except Exception:  # noqa: BLE001: no usable tokenizer -> token ids
        return None
