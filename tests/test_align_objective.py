"""GRPO/DPO objectives, masked reductions and reward parsing against numpy and hand computations."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.align import common, dpo, grpo, rewards, rollout, tasks


def test_group_normalization_matches_numpy():
    rng = np.random.default_rng(0)
    truths = [str(i % 3) for i in range(12)]
    responses = [str(int(x)) for x in rng.integers(0, 3, size=12)]

    def reward_fn(response, truth):
        right = float(response == truth)
        return {"reward": right + 0.25 * (response == "1"), "format_reward": 1.0, "answer_reward": right}

    raw = np.array([reward_fn(r, t)["reward"] for r, t in zip(responses, truths)])
    groups = raw.reshape(3, 4)
    eps = 0.1
    expected = ((groups - groups.mean(1, keepdims=True)) / (groups.std(1, ddof=1, keepdims=True) + eps)).ravel()
    advantages, raw_out, meta = grpo.compute_group_normalized_rewards(reward_fn, responses, truths, 4, eps, True)
    np.testing.assert_allclose(raw_out, raw, rtol=1e-6)
    np.testing.assert_allclose(advantages, expected, rtol=1e-5)
    centered, _, _ = grpo.compute_group_normalized_rewards(reward_fn, responses, truths, 4, eps, False)
    np.testing.assert_allclose(centered, (groups - groups.mean(1, keepdims=True)).ravel(), rtol=1e-6)
    assert meta["reward"] == pytest.approx(raw.mean())
    # A group of equal rewards gets zero advantage (no division by a zero std: eps).
    flat, _, _ = grpo.compute_group_normalized_rewards(reward_fn, ["0"] * 4, ["0"] * 4, 4, 1e-6, True)
    np.testing.assert_array_equal(flat, np.zeros(4))
    with pytest.raises(ValueError, match="groups of 4"):
        grpo.compute_group_normalized_rewards(reward_fn, ["0"] * 6, ["0"] * 6, 4)


def _loss_and_grad(loss_type, log_probs, **kw):
    def total(lp):
        return jnp.sum(grpo.policy_gradient_loss(lp, loss_type, **kw)[0])

    per_token, meta = grpo.policy_gradient_loss(log_probs, loss_type, **kw)
    return np.asarray(per_token), np.asarray(jax.grad(total)(log_probs)), meta


def test_loss_types_values_and_gradients_by_hand():
    log_probs = jnp.array([[-0.5, -1.0], [-2.0, -0.1]])
    rewards_ = jnp.array([[2.0], [-1.0]])
    loss, grad, _ = _loss_and_grad("no_baseline", log_probs, raw_rewards=rewards_)
    np.testing.assert_allclose(loss, [[1.0, 2.0], [-2.0, -0.1]], rtol=1e-6)  # -R * log pi
    np.testing.assert_allclose(grad, [[-2.0, -2.0], [1.0, 1.0]])  # d/dlogpi = -R
    advantages = jnp.array([[0.5], [-1.5]])
    loss, grad, _ = _loss_and_grad("reinforce_with_baseline", log_probs, advantages=advantages)
    np.testing.assert_allclose(loss, [[0.25, 0.5], [-3.0, -0.15]], rtol=1e-6)
    np.testing.assert_allclose(grad, [[-0.5, -0.5], [1.5, 1.5]])
    # grpo_clip: rho = e^{logp - old}; A = 1 with rho = 1.5 (clipped to 1.2) and rho = 0.9 (inside);
    # A = -1 with rho = 0.5 (clipped to 0.8) and rho = 1.1 (inside).
    old = jnp.zeros((2, 2))
    lp = jnp.log(jnp.array([[1.5, 0.9], [0.5, 1.1]]))
    loss, grad, meta = _loss_and_grad("grpo_clip", lp, advantages=jnp.array([[1.0], [-1.0]]),
                                      old_log_probs=old, cliprange=0.2)
    np.testing.assert_allclose(loss, [[-1.2, -0.9], [0.8, 1.1]], rtol=1e-6)
    # d(-rho A)/dlogpi = -rho A where unclipped; 0 on the clipped side.
    np.testing.assert_allclose(grad, [[0.0, -0.9], [0.0, 1.1]], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(meta["clipped"]), [[1, 0], [1, 0]])


def test_clip_does_not_bind_on_the_other_side():
    # A > 0 and rho < 1 - eps: min(rho A, clip A) = rho A, so the gradient stays -rho A (PPO's
    # pessimistic bound only clips improvements).
    lp = jnp.log(jnp.array([[0.5]]))
    loss, grad, meta = _loss_and_grad("grpo_clip", lp, advantages=jnp.array([[2.0]]),
                                      old_log_probs=jnp.zeros((1, 1)), cliprange=0.2)
    np.testing.assert_allclose(loss, [[-1.0]], rtol=1e-6)
    np.testing.assert_allclose(grad, [[-1.0]], rtol=1e-6)
    assert float(meta["clipped"][0, 0]) == 0.0


def test_masked_mean_and_normalize_each_axis_and_empty_rows():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 5))
    mask = (rng.random((3, 5)) < 0.6).astype(np.float64)
    mask[1] = 0.0  # an all-zero row: its mean is 0 by convention (documented in common.py)
    mask[0, 0] = 1.0
    for axis in (None, 0, 1):
        total = (x * mask).sum(axis=axis)
        count = mask.sum(axis=axis)
        expected = np.where(count == 0, 0.0, total / np.where(count == 0, 1.0, count))
        np.testing.assert_allclose(common.masked_mean(jnp.asarray(x), jnp.asarray(mask), axis), expected, rtol=1e-5)
        np.testing.assert_allclose(common.masked_normalize(jnp.asarray(x), jnp.asarray(mask), axis, 4.0),
                                   total / 4.0, rtol=1e-5)
    assert float(common.masked_mean(jnp.asarray(x), jnp.asarray(mask), 1)[1]) == 0.0
    # An inf outside the mask does not leak into either reduction.
    x[1, 2] = np.inf
    assert np.isfinite(float(common.masked_mean(jnp.asarray(x), jnp.asarray(mask))))


@pytest.mark.parametrize("aggregation", ["sequence", "constant", "token"])
def test_token_weights_reproduce_each_aggregation(aggregation):
    rng = np.random.default_rng(2)
    loss = rng.normal(size=(4, 6))
    mask = np.zeros((4, 6))
    for i, length in enumerate([1, 3, 6, 2]):
        mask[i, 1:1 + length] = 1.0
    weights = grpo.token_weights(mask, aggregation, constant=6.0)
    aggregated = float(grpo.aggregate(jnp.asarray(loss), jnp.asarray(mask), aggregation, constant=6.0))
    by_hand = {"sequence": np.mean([(loss[i] * mask[i]).sum() / mask[i].sum() for i in range(4)]),
               "constant": (loss * mask).sum() / (4 * 6.0), "token": (loss * mask).sum() / mask.sum()}
    assert aggregated == pytest.approx(by_hand[aggregation], rel=1e-5)
    assert float((weights * loss).sum()) == pytest.approx(by_hand[aggregation], rel=1e-5)


def test_k3_kl_is_nonnegative_and_zero_at_reference():
    lp = jnp.array([-1.0, -0.3, -2.0])
    ref = jnp.array([-1.0, -0.6, -1.0])
    kl = np.asarray(grpo.k3_kl(lp, ref))
    d = np.array([0.0, -0.3, 1.0])
    np.testing.assert_allclose(kl, np.exp(d) - d - 1, rtol=1e-6)
    assert kl[0] == 0.0 and (kl >= 0).all()


def test_dpo_loss_is_log2_at_reference_and_matches_hand_computation():
    same = jnp.array([-3.0, -7.5])
    np.testing.assert_allclose(dpo.dpo_loss(same, same + 1.0, same, same + 1.0, beta=0.1), [math.log(2)] * 2,
                               rtol=1e-6)
    # beta ((-2 - -3) - (-5 - -4)) = 0.5 * 2 = 1 -> -log sigmoid(1) = log(1 + e^-1)
    value = float(dpo.dpo_loss(jnp.array(-2.0), jnp.array(-5.0), jnp.array(-3.0), jnp.array(-4.0), beta=0.5))
    assert value == pytest.approx(math.log1p(math.exp(-1.0)), rel=1e-6)


def test_entropy_matches_float64():
    logits = np.random.default_rng(3).normal(size=(2, 3, 11)) * 3
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(common.entropy(jnp.asarray(logits)), -(p * np.log(p)).sum(-1), rtol=1e-5)


@pytest.mark.parametrize("response,truth,expected", [
    ("She makes 9 * 2 = $18 every day.\n#### 18", "18", (1, 1)),
    ("#### 1,000", "1000", (1, 1)),
    ("#### $1,000.00", "1000", (1, 1)),
    ("The answer is 42.", "42", (0, 1)),      # no ####: the last number counts
    ("3 apples and 4 pears, so 7.0", "7", (0, 1)),
    ("#### 17\nQuestion: ...", "18", (1, 0)),
    ("no number at all", "5", (0, 0)),
    ("#### -3", "-3", (1, 1)),
    ("#### 0.50", "0.5", (1, 1)),
])
def test_gsm8k_reward(response, truth, expected):
    result = rewards.gsm8k_reward(response, truth)
    assert (result["format_reward"], result["answer_reward"]) == expected
    assert result["reward"] == result["answer_reward"]


@pytest.mark.parametrize("response,expected", [
    (" 2 + 3 = 5 </think> <answer> 5 </answer>", (1, 1)),
    (" reasoning </think> <answer>$5.0</answer>", (1, 1)),
    (" reasoning </think> <answer> 6 </answer>", (1, 0)),
    (" reasoning <answer> 5 </answer>", (0, 0)),          # no </think>
    (" reasoning </think> 5", (0, 0)),                    # no answer tags
    (" </think> <answer> 5 </answer> trailing", (0, 0)),  # text after </answer>
])
def test_r1_reward(response, expected):
    result = rewards.r1_reward(response, "5")
    assert (result["format_reward"], result["answer_reward"]) == expected


def test_arithmetic_reward_and_task_split():
    assert rewards.arithmetic_reward("42", "42")["reward"] == 1.0
    assert rewards.arithmetic_reward("-7", "-7")["reward"] == 1.0
    assert rewards.arithmetic_reward("42 or 43", "42") == {"reward": 0.0, "format_reward": 0.0, "answer_reward": 0.0}
    assert rewards.arithmetic_reward("41", "42")["format_reward"] == 1.0
    train = tasks.arithmetic_examples(400, "train", seed=0)
    test = tasks.arithmetic_examples(400, "test", seed=0)
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    for example in train[:50]:
        assert str(eval(example.prompt[:-1])) == example.answer  # noqa: S307 (generated digits and +-*)
    # The default task: two-digit operands, + and - only (both occur, and negative results too).
    operands = [re.fullmatch(r"(\d+)([+-])(\d+)=", e.prompt).groups() for e in train + test]
    assert all(10 <= int(a) <= 99 and 10 <= int(b) <= 99 for a, _, b in operands)
    assert {op for _, op, _ in operands} == {"+", "-"} and any(e.answer.startswith("-") for e in train)
    products = tasks.arithmetic_examples(50, "train", spec=tasks.ArithmeticSpec(0, 10, "*"))
    assert all(str(eval(e.prompt[:-1])) == e.answer and len(e.prompt) == 4 for e in products)  # noqa: S307
    with pytest.raises(ValueError, match="operations"):
        tasks.ArithmeticSpec(operations="/")
    assert tasks.arithmetic_examples(5, "train", seed=3) == tasks.arithmetic_examples(5, "train", seed=3)
    assert tasks.arithmetic_examples(5, "train", seed=3) != tasks.arithmetic_examples(5, "train", seed=4)


def test_arithmetic_digit_reward_gives_right_aligned_partial_credit():
    exact = rewards.arithmetic_digit_reward("130", "130")
    assert exact == {"reward": 1.0, "format_reward": 1.0, "answer_reward": 1.0}
    assert rewards.arithmetic_digit_reward("131", "130") == {"reward": 2 / 3, "format_reward": 1.0, "answer_reward": 0.0}
    assert rewards.arithmetic_digit_reward("13", "130")["reward"] == 0.0  # 3|0, 1|3: nothing aligned matches
    assert rewards.arithmetic_digit_reward("1300", "130")["reward"] == 0.25  # the extra digit costs
    assert rewards.arithmetic_digit_reward("53", "-53")["reward"] == 2 / 3  # the sign is a character
    assert rewards.arithmetic_digit_reward("53 or 54", "53") == {"reward": 0.0, "format_reward": 0.0,
                                                                 "answer_reward": 0.0}


def test_mcnemar_exact_test_by_hand():
    from jaxlm.align import evaluate

    before = [0] * 10 + [1] * 3 + [1] * 5 + [0] * 4
    after = [1] * 10 + [0] * 3 + [1] * 5 + [0] * 4
    # 13 discordant problems, 10 fixed and 3 broken: p = 2 * sum_{k<=3} C(13, k) / 2^13.
    expected = 2 * (1 + 13 + 78 + 286) / 2**13
    assert evaluate.mcnemar_test(before, after) == {"fixed": 10, "broken": 3, "p_value": pytest.approx(expected)}
    assert evaluate.mcnemar_test([1, 0], [1, 0])["p_value"] == 1.0  # no discordant pair: no evidence
    assert evaluate.mcnemar_test([0] * 3, [1] * 3)["p_value"] == pytest.approx(0.25)  # 2 / 2^3
    with pytest.raises(ValueError, match="equal lengths"):
        evaluate.mcnemar_test([1], [1, 0])


def test_pass_at_k_by_hand_and_by_enumeration():
    """Chen et al.'s estimator: 1 - C(n-c, k)/C(n, k) = P(some of k draws without replacement from
    the n samples is correct), checked by hand and by enumerating the k-subsets."""
    import itertools

    from jaxlm.align import evaluate
    # n = 4 samples; problem A 1 correct, problem B 0, problem C 4.
    assert evaluate.pass_at_k(4, [1, 0, 4], 1) == pytest.approx((1 / 4 + 0 + 1) / 3)
    assert evaluate.pass_at_k(4, [1, 0, 4], 2) == pytest.approx((1 - 3 / 6 + 0 + 1) / 3)
    for n, c, k in ((5, 2, 3), (8, 3, 4), (6, 1, 6)):
        outcomes = [1] * c + [0] * (n - c)
        subsets = list(itertools.combinations(range(n), k))
        expected = sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)
        assert evaluate.pass_at_k(n, [c], k) == pytest.approx(expected)
    with pytest.raises(ValueError, match="k <= samples"):
        evaluate.pass_at_k(4, [1], 8)


def test_gsm8k_example_templates():
    plain = tasks.gsm8k_example("Q?", "2 + 2 = <<2+2=4>>4 apples\n#### 4")
    assert plain.solution == " 2 + 2 = 4 apples\n#### 4" and plain.answer == "4"
    r1 = tasks.gsm8k_example("Q?", "2 + 2 = <<2+2=4>>4\n#### 4", template="r1")
    assert r1.prompt.endswith("User: Q?\nAssistant: <think>")
    assert rewards.r1_reward(r1.solution, r1.answer)["reward"] == 1.0


def test_stop_strings_cut_after_the_completing_token():
    tokenizer = tasks.byte_tokenizer()
    ids = tokenizer.encode("7 </answer> junk")
    keep = rollout.cut_at_stop(ids, tokenizer, ["</answer>"])
    assert tokenizer.decode(ids[:keep]) == "7 </answer>"
    assert rollout.cut_at_stop(ids, tokenizer, ["none"]) == len(ids)
