"""Verifiable rewards: `reward_fn(response, ground_truth) -> {"reward", "format_reward", "answer_reward"}`.

All three are 0.0 or 1.0. `reward` is what GRPO maximizes; the other two are diagnostics.

Numbers are compared after `normalize_number`: commas, `$`, spaces and a trailing `.` removed,
then read exactly as a decimal, so "1,000", "$1000", "1000.0" and "1000." are all "1000", and
"0.50" is "0.5". Text that is not a number normalizes to None and never matches.

- `gsm8k_reward`: the answer is what follows the last `#### ` (GSM8K's solution format), else
  the last number in the response; format_reward = 1 when `####` is present.
- `r1_reward` (DeepSeek-R1-Zero's template, Guo et al. 2025, sec. 2.2.1): the response must be
  `<think> ... </think> <answer> ... </answer>` (the prompt ends with "<think>", so the response
  starts inside the thinking); format_reward = 1 when it is, and only then is the answer (the
  last number inside <answer>) checked. Badly formatted responses get reward 0.
- `arithmetic_reward`: the response must be just an integer (the embedded arithmetic task).
- `arithmetic_digit_reward`: the same check with partial credit (reward shaping that stays
  verifiable): an integer response earns the fraction of the ground truth's characters (sign
  included) it matches position by position from the right, divided by the longer of the two
  lengths, so a wrong length costs and only the exact answer earns 1. "131" for "130" gets 2/3,
  "13" gets 0 (nothing aligned matches), "-53" for "-53" 1. `answer_reward` stays exact (0/1).
"""

from __future__ import annotations

import decimal
import re
from typing import Callable, Optional

RewardFn = Callable[[str, str], dict]

_NUMBER = re.compile(r"-?[$]?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_R1_FORMAT = re.compile(r"^(.*?)</think>\s*<answer>(.*?)</answer>\s*$", re.DOTALL)
_INTEGER = re.compile(r"^\s*-?\d+\s*$")


def normalize_number(text: Optional[str]) -> Optional[str]:
    """A canonical string of the number in `text` ("1,000.0" -> "1000"), or None."""
    if text is None:
        return None
    cleaned = text.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        value = decimal.Decimal(cleaned)
    except decimal.InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def last_number(text: str) -> Optional[str]:
    """The last number written in `text` (commas and `$` allowed inside it), or None."""
    matches = _NUMBER.findall(text)
    return matches[-1] if matches else None


def extract_gsm8k_answer(text: str) -> Optional[str]:
    """The normalized answer of a GSM8K-style solution: after the last `####`, else the last number."""
    if "####" in text:
        after = text.rsplit("####", 1)[1].strip()
        number = last_number(after.split("\n")[0]) if after else None
        return normalize_number(number if number is not None else after)
    return normalize_number(last_number(text))


def _result(format_ok: bool, answer_ok: bool) -> dict:
    return {"reward": float(answer_ok), "format_reward": float(format_ok), "answer_reward": float(answer_ok)}


def answers_match(predicted: Optional[str], ground_truth: str) -> bool:
    truth = normalize_number(ground_truth)
    return predicted is not None and truth is not None and predicted == truth


def gsm8k_reward(response: str, ground_truth: str) -> dict:
    """1 when the response's answer (#### N, else its last number) equals the ground truth."""
    return _result("####" in response, answers_match(extract_gsm8k_answer(response), ground_truth))


def r1_reward(response: str, ground_truth: str) -> dict:
    """R1-Zero format `... </think> <answer> N </answer>`; the answer counts only when formatted."""
    match = _R1_FORMAT.match(response)
    if match is None or "<answer>" in match.group(1):
        return _result(False, False)
    predicted = normalize_number(last_number(match.group(2)))
    return _result(True, answers_match(predicted, ground_truth))


def arithmetic_reward(response: str, ground_truth: str) -> dict:
    """The response must be exactly one integer (surrounding spaces allowed) equal to the truth."""
    if not _INTEGER.match(response):
        return _result(False, False)
    return _result(True, answers_match(normalize_number(response), ground_truth))


def arithmetic_digit_reward(response: str, ground_truth: str) -> dict:
    """`arithmetic_reward` with partial credit for the characters right-aligned with the truth."""
    result = arithmetic_reward(response, ground_truth)
    if not result["format_reward"] or result["answer_reward"]:
        return result
    predicted, truth = response.strip(), ground_truth.strip()
    matching = sum(p == t for p, t in zip(reversed(predicted), reversed(truth)))
    return {**result, "reward": matching / max(len(predicted), len(truth))}


REWARDS: dict[str, RewardFn] = {"gsm8k": gsm8k_reward, "r1": r1_reward, "arithmetic": arithmetic_reward,
                                "arithmetic_digits": arithmetic_digit_reward}


def get_reward(name: str) -> RewardFn:
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; choose one of {', '.join(REWARDS)}")
    return REWARDS[name]
