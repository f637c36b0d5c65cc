"""Checkpoints: round trip onto another mesh, retention, and interrupted saves."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxlm import config, sharding
from jaxlm.checkpoint import CheckpointManager, abstract_like

CFG = config.load_preset("tiny")


def make_state(mesh, spec, seed=0):
    rng = np.random.default_rng(seed)
    target = NamedSharding(mesh, spec)
    return {"params": {"w": jax.device_put(rng.normal(size=(24, 40)).astype(np.float32), target)},
            "step": jnp.int32(seed)}


def test_restore_onto_another_mesh_reshards(tmp_path):
    mesh_a = sharding.make_mesh("data=8")
    state = make_state(mesh_a, PartitionSpec("data", None))
    manager = CheckpointManager(tmp_path)
    manager.save(5, state, data_state={"next_index": 7}, config=CFG)
    manager.close()

    mesh_b = sharding.make_mesh("fsdp=2,tensor=4")
    target = {"params": {"w": NamedSharding(mesh_b, PartitionSpec("fsdp", "tensor"))},
              "step": NamedSharding(mesh_b, PartitionSpec())}
    reopened = CheckpointManager(tmp_path)
    restored, data_state, cfg = reopened.restore(reopened.latest_step(), abstract_like(state, target))
    assert data_state == {"next_index": 7} and cfg == CFG
    assert restored["params"]["w"].sharding == target["params"]["w"]
    np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), np.asarray(state["params"]["w"]))


def test_keeps_last_k_and_every_mth(tmp_path):
    mesh = sharding.make_mesh("data=8")
    manager = CheckpointManager(tmp_path, keep_last=2, keep_every=4, async_save=False)
    for step in range(1, 10):
        manager.save(step, make_state(mesh, PartitionSpec(), step), data_state={}, config=CFG)
    manager.close()
    assert CheckpointManager(tmp_path).all_steps() == [4, 8, 9]


def test_an_unfinished_save_leaves_the_previous_checkpoint_usable(tmp_path):
    """A process killed while orbax writes step 2 leaves only a temporary directory."""
    script = textwrap.dedent(f"""
        import os, jax, jax.numpy as jnp, numpy as np
        from jaxlm import config
        from jaxlm.checkpoint import CheckpointManager
        manager = CheckpointManager({str(tmp_path)!r}, async_save=True)
        manager.save(1, {{"w": jnp.ones((64, 64))}}, data_state={{"next_index": 1}}, config=config.load_preset("tiny"))
        manager.wait()
        # Step 2: the items are written, then the process dies where orbax would rename the
        # temporary directory (patching the manager's finalize thread instead raced the writer:
        # under load the process could die before the temporary directory existed).
        from orbax.checkpoint._src.path import atomicity
        async def die(*args, **kwargs):
            os._exit(17)
        atomicity.AtomicRenameTemporaryPath.finalize = die
        manager.save(2, {{"w": jnp.full((64, 64), 2.0)}}, data_state={{"next_index": 2}}, config=config.load_preset("tiny"))
        manager.wait()
        os._exit(0)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 17, result.stderr[-2000:]
    leftovers = os.listdir(tmp_path / "checkpoints")
    assert "1" in leftovers and "2" not in leftovers and any("tmp" in name for name in leftovers), leftovers
    manager = CheckpointManager(tmp_path)
    assert manager.latest_step() == 1
    mesh = sharding.make_mesh("data=8")
    target = {"w": jax.ShapeDtypeStruct((64, 64), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))}
    state, data_state, _ = manager.restore(1, target)
    assert data_state == {"next_index": 1} and float(state["w"].sum()) == 64 * 64
    manager.close()
