"""The model's invariants: sharded == single device, causality, packing, GQA shapes, caching."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import kv_cache, model, sharding
from jaxlm.config import ModelConfig

# Prime-ish sizes so a swapped dim fails loudly; every sharded dim divides the test meshes.
CFG = ModelConfig(vocab_size=262, embed_dim=48, num_layers=3, num_heads=6, num_kv_heads=2,
                  head_dim=8, mlp_dim=136, max_seq_len=64, compute_dtype="float32",
                  qkv_bias=False)
SEQ = 29


def _tokens(seed, batch=8, length=SEQ, vocab=CFG.vocab_size):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, vocab, dtype=jnp.int32)


def _randomize(params, seed=7):
    """Norm scales and biases start at ones/zeros; perturb them so they are really tested."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
                                        for x, k in zip(leaves, keys)])


def _forward(cfg, params, tokens, **kwargs):
    return jax.jit(model.forward, static_argnums=0)(cfg, params, tokens, **kwargs)[0]


def _rel_error(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope="module")
def params():
    return _randomize(model.init_params(CFG, jax.random.key(0)))


@pytest.mark.parametrize("mesh_spec", ["data=8", "fsdp=8", "data=2,fsdp=2,tensor=2", "fsdp=4,tensor=2"])
def test_sharded_forward_equals_single_device(params, mesh_spec):
    tokens = _tokens(1)
    expected = _forward(CFG, params, tokens)
    mesh = sharding.make_mesh(mesh_spec)
    shardings = model.param_shardings(CFG, mesh)
    sharded_params = jax.device_put(params, shardings)
    with jax.set_mesh(mesh):
        logits = _forward(CFG, sharded_params, tokens)
    assert _rel_error(logits, expected) <= 1e-5
    # Block-boundary constraint: logits are split over batch by data x fsdp, vocab by tensor.
    expected_sharding = sharding.named_sharding(mesh, model.LOGITS_AXES)
    assert logits.sharding.is_equivalent_to(expected_sharding, logits.ndim)


def test_params_created_sharded_follow_rules():
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    params = model.init_params(CFG, jax.random.key(0), mesh)
    axes = model.param_axes(CFG)
    flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_axes = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
    assert len(flat_params) == len(flat_axes) == 12
    for (path, array), logical in zip(flat_params, flat_axes):
        expected = jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(logical))
        assert array.sharding.is_equivalent_to(expected, array.ndim), (path, array.sharding)
    # Spot-check the rules table itself, independently of logical_to_spec.
    q = params["blocks"]["attn"]["q"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (3, 24, 3, 8)
    # Same values as the unsharded init with the same key.
    plain = model.init_params(CFG, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(q), np.asarray(plain["blocks"]["attn"]["q"]))


def test_causality_prefix_logits_equal_prefix_of_logits(params):
    tokens = _tokens(2, batch=2)
    full = _forward(CFG, params, tokens)
    for prefix in (1, 11, SEQ - 1):
        part = _forward(CFG, params, tokens[:, :prefix])
        np.testing.assert_allclose(part, full[:, :prefix], rtol=1e-5, atol=1e-5)
    # And a changed future token changes only later logits.
    changed = tokens.at[:, 17].set((tokens[:, 17] + 1) % CFG.vocab_size)
    other = _forward(CFG, params, changed)
    np.testing.assert_allclose(other[:, :17], full[:, :17], rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(other[:, 17:] - full[:, 17:])).max() > 1e-3


def test_packed_sequences_equal_each_document_alone(params):
    lengths = [7, 13, 9]
    docs = [_tokens(10 + i, batch=1, length=n)[0] for i, n in enumerate(lengths)]
    tokens = jnp.concatenate(docs)[None]
    segment_ids = jnp.concatenate([jnp.full(n, i + 1) for i, n in enumerate(lengths)])[None]
    positions = jnp.concatenate([jnp.arange(n) for n in lengths])[None]
    packed = _forward(CFG, params, tokens, positions=positions, segment_ids=segment_ids)
    start = 0
    for doc, n in zip(docs, lengths):
        alone = _forward(CFG, params, doc[None])
        np.testing.assert_allclose(packed[:, start:start + n], alone, rtol=1e-5, atol=1e-5)
        start += n


@pytest.mark.parametrize("num_kv_heads", [1, 2, 6])
def test_grouped_query_attention_equals_repeated_kv_heads(num_kv_heads):
    """GQA with K kv heads == multi-head attention whose k/v weights repeat each kv head G times."""
    cfg = dataclasses.replace(CFG, num_kv_heads=num_kv_heads)
    params = _randomize(model.init_params(cfg, jax.random.key(3)))
    tokens = _tokens(4, batch=2)
    logits = _forward(cfg, params, tokens)
    assert logits.shape == (2, SEQ, cfg.vocab_size)
    groups = cfg.num_heads // num_kv_heads
    mha_cfg = dataclasses.replace(cfg, num_kv_heads=cfg.num_heads)
    mha_params = jax.tree.map(lambda x: x, params)
    for name in ("k", "v"):
        mha_params["blocks"]["attn"][name] = jnp.repeat(params["blocks"]["attn"][name], groups, axis=2)
    np.testing.assert_allclose(_forward(mha_cfg, mha_params, tokens), logits, rtol=1e-5, atol=1e-5)


def test_cached_prefill_and_decode_equal_full_forward(params):
    tokens = _tokens(5, batch=2)
    full = _forward(CFG, params, tokens)
    cache = kv_cache.init_cache(CFG, batch_size=2, max_len=40, dtype=jnp.float32)
    step = jax.jit(model.forward, static_argnums=0)
    logits, cache = step(CFG, params, tokens[:, :20], cache=cache)
    np.testing.assert_allclose(logits, full[:, :20], rtol=1e-5, atol=1e-5)
    for t in range(20, SEQ):
        logits, cache = step(CFG, params, tokens[:, t:t + 1], cache=cache)
        np.testing.assert_allclose(logits[:, 0], full[:, t], rtol=1e-5, atol=1e-5)
    assert np.asarray(cache["lengths"]).tolist() == [SEQ, SEQ]


@pytest.mark.parametrize("option", ["qkv_bias", "qk_norm", "tie_embeddings", "sliding_window"])
def test_variants_keep_causality_and_shapes(option):
    value = 5 if option == "sliding_window" else True
    cfg = dataclasses.replace(CFG, **{option: value})
    params = _randomize(model.init_params(cfg, jax.random.key(6)))
    assert ("lm_head" in params) != cfg.tie_embeddings
    tokens = _tokens(6, batch=2)
    full = _forward(cfg, params, tokens)
    np.testing.assert_allclose(_forward(cfg, params, tokens[:, :9]), full[:, :9], rtol=1e-5, atol=1e-5)
    if option == "sliding_window":
        # Window 5 over 3 layers: position 20 depends on positions 20 - 3 * 4 = 8 .. 20 only.
        changed = tokens.at[:, :8].set(0)
        np.testing.assert_allclose(_forward(cfg, params, changed)[:, 20], full[:, 20], rtol=1e-5, atol=1e-5)
        changed = tokens.at[:, 8].set((tokens[:, 8] + 1) % cfg.vocab_size)
        assert np.abs(np.asarray(_forward(cfg, params, changed)[:, 20] - full[:, 20])).max() > 1e-4


@pytest.mark.parametrize("policy,unroll,save", [
    ("full", 1, ""), ("save_dots", 1, ""), ("none", 2, ""), ("save_dots", 3, ""),
    ("full", 1, "mlp_hidden"), ("save_dots", 3, "norm,rope,mlp_hidden"),
])
def test_remat_and_unrolled_scans_give_same_loss_and_grads(params, policy, unroll, save):
    """Remat policies (with extra saved activations), and the layer scan unrolled (2 of 3 layers
    per iteration, or no loop) leave the loss and every gradient as the plain scan gives them."""
    tokens = _tokens(8, batch=2)

    def loss(cfg, p):
        logits = model.forward(cfg, p, tokens[:, :-1])[0]
        labels = tokens[:, 1:]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], -1))

    base_value, base_grads = jax.jit(jax.value_and_grad(lambda p: loss(CFG, p)))(params)
    cfg = dataclasses.replace(CFG, remat=policy, scan_unroll=unroll, remat_save=save)
    value, grads = jax.jit(jax.value_and_grad(lambda p: loss(cfg, p)))(params)
    np.testing.assert_allclose(value, base_value, rtol=1e-6)
    for g, b in zip(jax.tree.leaves(grads), jax.tree.leaves(base_grads)):
        np.testing.assert_allclose(g, b, rtol=1e-5, atol=1e-7)


def test_bf16_compute_close_to_fp32(params):
    tokens = _tokens(9, batch=2)
    full = _forward(CFG, params, tokens)
    low = _forward(dataclasses.replace(CFG, compute_dtype="bfloat16"), params, tokens)
    assert low.dtype == jnp.float32
    assert _rel_error(low, full) < 3e-2


def test_z_loss_matches_float64():
    logits = jax.random.normal(jax.random.key(11), (2, 5, 17)) * 3
    x = np.asarray(logits, np.float64)
    lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    np.testing.assert_allclose(model.z_loss(logits, weight=0.5), 0.5 * np.mean(lse ** 2), rtol=1e-5)


def test_mesh_errors_name_the_problem():
    with pytest.raises(sharding.MeshError, match="needs 4 devices but 8 are available"):
        sharding.make_mesh("fsdp=2,tensor=2")
    with pytest.raises(sharding.MeshError, match="unknown mesh axis 'model'"):
        sharding.make_mesh("model=8")
    mesh = sharding.make_mesh("tensor=8")
    with pytest.raises(sharding.MeshError, match=r"'blocks.attn.k' dim 2 \(kv_heads=2\).*size 8"):
        model.init_params(CFG, jax.random.key(0), mesh)
    with pytest.raises(sharding.MeshError, match="used twice"):
        sharding.logical_to_spec(("batch", "embed"))


def test_pallas_attention_in_the_model_equals_xla():
    """attention_impl="pallas" (interpret mode on CPU): plain, packed, and cached decoding."""
    cfg = dataclasses.replace(CFG, head_dim=16, num_layers=2)
    pallas_cfg = dataclasses.replace(cfg, attention_impl="pallas")
    params = _randomize(model.init_params(cfg, jax.random.key(12)))
    tokens = _tokens(13, batch=2, length=24)
    expected = _forward(cfg, params, tokens)
    np.testing.assert_allclose(_forward(pallas_cfg, params, tokens), expected, rtol=1e-5, atol=1e-5)
    segment_ids = jnp.repeat(jnp.array([[1, 2, 3]]), 8, axis=1).repeat(2, 0)
    positions = jnp.tile(jnp.arange(8), 3)[None].repeat(2, 0)
    kwargs = {"segment_ids": segment_ids, "positions": positions}
    np.testing.assert_allclose(_forward(pallas_cfg, params, tokens, **kwargs),
                               _forward(cfg, params, tokens, **kwargs), rtol=1e-5, atol=1e-5)
    cache = kv_cache.init_cache(cfg, batch_size=2, max_len=32, dtype=jnp.float32)
    step = jax.jit(model.forward, static_argnums=0)
    logits, cache = step(pallas_cfg, params, tokens[:, :20], cache=cache)
    np.testing.assert_allclose(logits, expected[:, :20], rtol=1e-5, atol=1e-5)
    logits, cache = step(pallas_cfg, params, tokens[:, 20:21], cache=cache)
    np.testing.assert_allclose(logits[:, 0], expected[:, 20], rtol=1e-5, atol=1e-5)
