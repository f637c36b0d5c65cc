"""Tasks with verifiable answers: procedurally generated arithmetic (the embedded default) and
GSM8K-format JSONL files.

An `Example` is (prompt, solution, answer): `prompt` is the text the model continues, `solution`
the text SFT imitates (a response that ends in the right answer), `answer` the ground truth a
reward function checks. A `Task` adds the reward function and the stop strings of rollouts.

Arithmetic: problems `a+b=` and `a-b=` with two-digit operands 10 <= a, b < 100 by default
(`ArithmeticSpec`; `*` with a one-digit b is available), written without spaces; the solution is
the exact integer result (negative for a < b). Both operands are uniform in their range, so there
are 2 x 90 x 90 = 16,200 distinct problems and no one-digit facts to memorize: a model gains on the
held-out split by getting the digits and carries right, which a reward can reinforce (docs/alignment_cpu.md:
a one- and two-digit mix let the SFT policy memorize the short facts, and GRPO
then only churned them). The train and test splits are disjoint by construction: a problem is a
test problem when a hash of its text falls in the first `TEST_FRACTION` of the hash range, and
each split is then sampled with its own seed, so held-out accuracy is measured on problems never
trained on.

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


@dataclasses.dataclass(frozen=True)
class ArithmeticSpec:
    """Which problems the generator draws: operands in [min_operand, max_operand), `operations`
    among "+-*" (a product's second operand is one digit)."""

    min_operand: int = 10
    max_operand: int = 100
    operations: str = "+-"

    def __post_init__(self):
        if not 0 <= self.min_operand < self.max_operand:
            raise ValueError(f"need 0 <= min_operand < max_operand, got {self.min_operand}, {self.max_operand}")
        if not self.operations or set(self.operations) - set("+-*"):
            raise ValueError(f"operations must be a non-empty string of + - *, got {self.operations!r}")


def arithmetic_problem(rng: random.Random, spec: ArithmeticSpec = ArithmeticSpec()) -> Example:
    op = rng.choice(spec.operations)
    a = rng.randrange(spec.min_operand, spec.max_operand)
    b = rng.randrange(10) if op == "*" else rng.randrange(spec.min_operand, spec.max_operand)
    result = a + b if op == "+" else a - b if op == "-" else a * b
    return Example(prompt=f"{a}{op}{b}=", solution=str(result), answer=str(result))


def arithmetic_examples(count: int, split: str, seed: int = 0,
                        spec: ArithmeticSpec = ArithmeticSpec()) -> list[Example]:
    """`count` problems of the "train" or "test" split (disjoint; repeats within a split possible)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(f"{split}-{seed}")
    want_test = split == "test"
    out = []
    while len(out) < count:
        example = arithmetic_problem(rng, spec)
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
