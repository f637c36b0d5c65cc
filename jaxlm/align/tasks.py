"""Tasks with verifiable answers: procedurally generated arithmetic (the embedded default) and
GSM8K-format JSONL files.

An `Example` is (prompt, solution, answer): `prompt` is the text the model continues, `solution`
the text SFT imitates (a response that ends in the right answer), `answer` the ground truth a
reward function checks. A `Task` adds the reward function and the stop strings of rollouts.

Arithmetic: problems `a+b=`, `a-b=` and `a*b=` with a, b < `max_operand` (products use a
one-digit b), written without spaces; the solution is the exact integer result. Each operand's
number of digits is drawn uniformly first, then its value uniformly among those digits. The train and
test splits are disjoint by construction: a problem is a test problem when a hash of its text
falls in the first `TEST_FRACTION` of the hash range, and each split is then sampled with its own
seed, so held-out accuracy is measured on problems never trained on.

GSM8K (Cobbe et al. 2021): JSONL lines `{"question": ..., "answer": "... #### N"}`. Templates:
"plain" = "Question: Q\\nAnswer:" continued by the solution (calculator annotations `<<...>>`
removed), reward `gsm8k`; "r1" = the R1-Zero prompt ending in "<think>", continued by
"reasoning </think> <answer> N </answer>", reward `r1`.

`byte_tokenizer()` is the 256 byte values plus <|endoftext|> (vocab 257): a jaxlm `Tokenizer`
with no merges, so small arithmetic models see one token per character and save it in their
checkpoints like any other tokenizer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
from typing import Callable, Optional

from jaxlm.align import rewards

TEST_FRACTION = 0.2
R1_PROMPT = ("A conversation between User and Assistant. The User asks a question, and the Assistant "
             "solves it. The Assistant first thinks about the reasoning process in the mind and then "
             "provides the User with the answer. The reasoning process is enclosed within <think> "
             "</think> and answer is enclosed within <answer> </answer> tags, respectively, i.e., "
             "<think> reasoning process here </think> <answer> answer here </answer>.\n"
             "User: {question}\nAssistant: <think>")


@dataclasses.dataclass(frozen=True)
class Example:
    prompt: str
    solution: str
    answer: str


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    reward_fn: Callable[[str, str], dict]
    stop: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------
# Arithmetic


def _is_test_problem(text: str) -> bool:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "little") < TEST_FRACTION * 2**32


def random_operand(rng: random.Random, max_operand: int) -> int:
    """An operand below `max_operand` whose digit count is uniform (1 or 2 digits below 100).

    Uniform digit counts keep half the problems short enough for a tiny model to learn in a
    minute while the space stays large (about 21,000 distinct problems below 100), so a model
    cannot pass the held-out split by memorizing the training split.
    """
    digits = rng.randint(1, len(str(max_operand - 1)))
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randrange(low, min(10 ** digits, max_operand))


def arithmetic_problem(rng: random.Random, max_operand: int) -> Example:
    op = rng.choice("+-*")
    a = random_operand(rng, max_operand)
    b = rng.randrange(10) if op == "*" else random_operand(rng, max_operand)
    result = a + b if op == "+" else a - b if op == "-" else a * b
    return Example(prompt=f"{a}{op}{b}=", solution=str(result), answer=str(result))


def arithmetic_examples(count: int, split: str, seed: int = 0, max_operand: int = 100) -> list[Example]:
    """`count` problems of the "train" or "test" split (disjoint; repeats within a split possible)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(f"{split}-{seed}")
    want_test = split == "test"
    out = []
    while len(out) < count:
        example = arithmetic_problem(rng, max_operand)
        if _is_test_problem(example.prompt) == want_test:
            out.append(example)
    return out


ARITHMETIC = Task("arithmetic", rewards.arithmetic_reward)


# ---------------------------------------------------------------------------------------------
# GSM8K


def _clean_solution(answer: str) -> str:
    """GSM8K's solution without the calculator annotations `<<48/2=24>>`."""
    return re.sub(r"<<[^>]*>>", "", answer)


def gsm8k_example(question: str, answer: str, template: str = "plain") -> Example:
    solution = _clean_solution(answer)
    truth = rewards.extract_gsm8k_answer(solution) or ""
    if template == "plain":
        return Example(prompt=f"Question: {question}\nAnswer:", solution=" " + solution, answer=truth)
    if template == "r1":
        reasoning = solution.rsplit("####", 1)[0].strip()
        return Example(prompt=R1_PROMPT.format(question=question),
                       solution=f" {reasoning} </think> <answer> {truth} </answer>", answer=truth)
    raise ValueError(f"unknown template {template!r}; choose plain or r1")


def load_gsm8k(path: str, template: str = "plain", limit: Optional[int] = None) -> list[Example]:
    """Examples of a GSM8K-format JSONL file ({"question", "answer"} per line)."""
    examples = []
    with open(path, encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                question, answer = record["question"], record["answer"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{path}:{line_number}: expected a JSON object with \"question\" and "
                                 f"\"answer\" (GSM8K format)") from None
            examples.append(gsm8k_example(question, answer, template))
            if limit is not None and len(examples) >= limit:
                break
    if not examples:
        raise ValueError(f"{path} has no examples")
    return examples


def gsm8k_task(template: str = "plain") -> Task:
    reward = rewards.gsm8k_reward if template == "plain" else rewards.r1_reward
    stop = ("\nQuestion:",) if template == "plain" else ("</answer>",)
    return Task(f"gsm8k-{template}", reward, stop)


# ---------------------------------------------------------------------------------------------
# Tokenizer


def byte_tokenizer():
    """Bytes as tokens 0..255 and <|endoftext|> = 256 (vocab 257)."""
    from jaxlm.tokenizer import Tokenizer

    return Tokenizer({value: bytes([value]) for value in range(256)}, [], ["<|endoftext|>"])
