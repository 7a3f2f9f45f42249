"""Question answering from dataset files, with a reward by name and optional tools: `--env.name qa`.

Each episode is one record of `env.qa.train_files` (evaluation: `env.qa.val_files`, default the same
files). The prompt is the question, plus the tools and the reply format when tools are on. The agent's
utterances are free-form text (decoding is not constrained to a set of actions):

- without tools, the first reply is the answer: the episode ends with reward `reward(reply, answer,
  fields)`, where `reward` is `env.qa.reward` (fastarcher/rewards.py: a built-in name or
  `package.module:function`) and `fields` the record's other fields;
- with tools, each reply is a tool call or a final answer in `env.qa.action_format` (fastarcher/tools/
  parse.py): a call answers with the tool's output as the next observation, a final answer ends the
  episode with its reward, and a reply that parses as neither answers with the reason at
  `invalid_reward`. `max_turns` replies at most; running out scores 0.

Which record an episode gets: the seed's place in an endless sequence of epochs, each a fresh
permutation of the training records drawn from (`shuffle_seed`, epoch), so the order is a function of
the seeds the trainer hands out, and a resumed run, whose seeds go on where they stopped, continues it
exactly. Evaluation episodes (runner split "eval") take validation record `seed mod size`.
"""
from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field
from typing import Annotated, Literal

import tyro

from fastarcher.data import Record, load_dataset
from fastarcher.envs.base import check_positive
from fastarcher.rewards import get_reward, score
from fastarcher.tools.base import Tool, ToolCall, run_tool
from fastarcher.tools.calculator import Calculator
from fastarcher.tools.parse import ACTION_FORMATS, FinalAnswer, Unparsed, format_answer, format_call
from fastarcher.tools.python_exec import PythonExecutor
from fastarcher.tools.retrieval import Search

TOOL_CLASSES = {"calculator": Calculator, "python": PythonExecutor, "search": Search}


def make_tool(name: str, cfg: "QAConfig") -> Tool:
    if name == "search":
        return _search(tuple(cfg.corpus_files), cfg.search_k)
    return TOOL_CLASSES[name]()


@functools.lru_cache(maxsize=4)
def _search(files: tuple[str, ...], k: int) -> Search:
    """One BM25 index per process and corpus, however many envs a runner builds."""
    return Search.from_files(files, k)


@dataclass(kw_only=True)
class QAConfig:
    """Settings of the `qa` env."""

    train_files: Annotated[tuple[str, ...], tyro.conf.arg(aliases=("--data.train-files",))] = ()
    """Training records: .json (a list of objects) or .jsonl files, each object with `question` and `answer`."""
    val_files: Annotated[tuple[str, ...], tyro.conf.arg(aliases=("--data.val-files",))] = ()
    """Evaluation records (default: the training files)."""
    reward: Annotated[str, tyro.conf.arg(aliases=("--reward.name",))] = "math_equiv"
    """Reward function: exact_match, normalized_match, qa_em, qa_f1, math_equiv, or `package.module:function`."""
    tools: tuple[Literal["calculator", "python", "search"], ...] = ()
    """Tools the agent may call (none: the first reply is the answer); an `answer` tool call is always a final answer."""
    corpus_files: tuple[str, ...] = ()
    """Passages the `search` tool ranks with BM25: .json / .jsonl objects with `text` (and optional `title`)."""
    search_k: int = 2
    """Passages one `search` call returns."""
    action_format: Literal["react", "json"] = "json"
    """How a reply calls a tool or answers when tools are on (fastarcher/tools/parse.py). Replies are one line."""
    max_turns: int = 4
    """Replies per episode with tools (without tools an episode is one reply)."""
    instructions: bool = True
    """With tools, start the prompt with the tools and the reply format (off: the question only, for a small
    model that learns the format from demonstrations and would pay for ~150 more prompt tokens)."""
    max_tool_chars: int = 200
    """Tool output longer than this is cut."""
    shuffle: bool = True
    """Reshuffle the training records every epoch (off: file order)."""
    shuffle_seed: int = 0
    """Seed of the per-epoch permutations."""
    success_threshold: float = 1.0
    """An answer whose reward reaches this counts as a success."""
    invalid_reward: float = 0.0
    """Reward of a reply that is neither a tool call nor an answer."""

    def validate(self) -> None:
        if not self.train_files:
            raise ValueError("env.qa.train_files is empty: give --env.qa.train-files FILE.jsonl (records with "
                             "'question' and 'answer'; docs/custom_env.md)")
        check_positive("env.qa.max_turns", self.max_turns)
        check_positive("env.qa.max_tool_chars", self.max_tool_chars)
        check_positive("env.qa.search_k", self.search_k)
        if "search" in self.tools and not self.corpus_files:
            raise ValueError("env.qa.tools has 'search' but no corpus: give --env.qa.corpus-files PASSAGES.jsonl")
        if "search" in self.tools:
            _search(tuple(self.corpus_files), self.search_k)  # a bad corpus file stops the run here
        for name in self.tools:
            if name not in TOOL_CLASSES:
                raise ValueError(f"env.qa.tools: unknown tool {name!r} (tools: {', '.join(TOOL_CLASSES)})")
        if self.action_format not in ACTION_FORMATS:
            raise ValueError(f"env.qa.action_format ({self.action_format!r}) must be one of {', '.join(ACTION_FORMATS)}")
        get_reward(self.reward)  # a bad name or import path fails here


@functools.lru_cache(maxsize=8)
def _records(files: tuple[str, ...]) -> tuple[Record, ...]:
    """The records of `files`, read once per process however many envs a runner builds."""
    return tuple(load_dataset(list(files)))


@functools.lru_cache(maxsize=8)
def _check_tool_calls(files: tuple[str, ...]) -> None:
    """Every record's `tool_calls` parse (ValueError naming file and line otherwise), once per process and
    file set, not once per env a runner builds."""
    for record in _records(files):
        oracle_calls(record)


def oracle_calls(record: Record) -> list[ToolCall]:
    """The record's optional `tool_calls` field, the calls a demonstration makes before answering."""
    raw = record.fields.get("tool_calls", [])
    if not isinstance(raw, list) or not all(isinstance(c, dict) and isinstance(c.get("name"), str)
                                            and isinstance(c.get("arguments", {}), dict) for c in raw):
        raise ValueError(f"{record.source}: field 'tool_calls' must be a list of "
                         '{"name": TOOL, "arguments": {...}} objects')
    return [ToolCall(c["name"], dict(c.get("arguments", {}))) for c in raw]


_FORMAT_HELP = {
    "json": 'Reply on one line with {"name": TOOL, "arguments": {...}} to call a tool, or {"answer": ANSWER}.',
    "react": "Reply on one line with Action: TOOL Action Input: INPUT to call a tool, or Final Answer: ANSWER.",
}


class QA:
    """See the module docstring."""

    name = "qa"
    free_form_actions = True
    """Replies are free text: decoding is not constrained, and `action_choices` only lists examples."""
    dense_seeds = True
    """Seeds index the record sequence: the trainer hands out consecutive seeds, without gaps."""

    def __init__(self, cfg: QAConfig):
        cfg.validate()
        self.cfg = cfg
        self.train = _records(tuple(cfg.train_files))
        self.val = _records(tuple(cfg.val_files)) if cfg.val_files else self.train
        self.reward_fn = get_reward(cfg.reward)
        self.tools: dict[str, Tool] = {name: make_tool(name, cfg) for name in cfg.tools}
        self.parse = ACTION_FORMATS[cfg.action_format]
        self.max_turns = cfg.max_turns if self.tools else 1
        if self.tools:
            _check_tool_calls(tuple(cfg.train_files))  # a malformed `tool_calls` field stops the run before any work
        self.split = "train"
        self._orders: dict[int, list[int]] = {}
        self.record: Record | None = None
        self._turn, self._done = 0, True

    # -- which record ----------------------------------------------------------------------------------
    def use_split(self, split: str) -> None:
        """'train' (default) or 'eval': which records `reset` draws from."""
        if split not in ("train", "eval"):
            raise ValueError(f"split ({split!r}) must be 'train' or 'eval'")
        self.split = split

    def record_index(self, seed: int) -> int:
        if self.split == "eval":
            return seed % len(self.val)
        size = len(self.train)
        epoch, position = divmod(seed, size)
        if not self.cfg.shuffle:
            return position
        if epoch not in self._orders:
            order = list(range(size))
            random.Random(f"{self.cfg.shuffle_seed}/{epoch}").shuffle(order)
            self._orders = {epoch: order}  # episodes of one batch share an epoch or two
        return self._orders[epoch][position]

    # -- protocol ----------------------------------------------------------------------------------------
    def prompt(self, record: Record) -> str:
        question = " ".join(record.question.split())
        if not self.tools:
            return f"Question: {question}\nAnswer:\n"
        if not self.cfg.instructions:
            return f"Question: {question}\n"
        tools = "; ".join(f"{t.name} ({', '.join(t.parameters)}): {t.description}" for t in self.tools.values())
        return f"Tools: {tools}\n{_FORMAT_HELP[self.cfg.action_format]}\nQuestion: {question}\n"

    def reset(self, seed: int) -> str:
        records = self.val if self.split == "eval" else self.train
        self.record = records[self.record_index(seed)]
        self._turn, self._done = 0, False
        return self.prompt(self.record)

    def step(self, action_text: str) -> tuple[str, float, bool, dict]:
        if self.record is None or self._done:
            raise RuntimeError("qa: step() called before reset() or after the episode ended")
        self._turn += 1
        text = action_text if isinstance(action_text, str) else ""
        parsed = FinalAnswer(text) if not self.tools else self.parse(text, self.tools)
        invalid, reward, terminal, success = False, 0.0, False, False
        if isinstance(parsed, FinalAnswer):
            reward = score(self.reward_fn, parsed.text, self.record.answer, self.record.fields)
            terminal, success = True, reward >= self.cfg.success_threshold
            obs = "correct\n" if success else "incorrect\n"
        elif isinstance(parsed, Unparsed):
            invalid, reward = True, self.cfg.invalid_reward
            obs = f"error: {parsed.reason}\n"
        else:
            obs = "Observation: " + " ".join(run_tool(self.tools, parsed, self.cfg.max_tool_chars).split()) + "\n"
        truncated = not terminal and self._turn >= self.max_turns
        self._done = terminal or truncated
        info = {"invalid": invalid, "success": success, "truncated": truncated, "turn": self._turn}
        return obs, float(reward), self._done, info

    def action_choices(self) -> list[str]:
        """Example replies (the answers themselves, in the reply format); not a closed set."""
        return [self._answer_text(r.answer) for r in self.train[:64]]

    def _answer_text(self, answer: str) -> str:
        return format_answer(answer, self.cfg.action_format) if self.tools else answer

    def oracle_action(self) -> str:
        """The demonstration for this turn: with tools, the record's `tool_calls` in order (a list of
        {"name": ..., "arguments": {...}}, optional), then the reference answer, in the reply format."""
        assert self.record is not None, "reset() first"
        calls = oracle_calls(self.record) if self.tools else []
        if self._turn < len(calls) and self._turn < self.max_turns - 1:
            return format_call(calls[self._turn], self.cfg.action_format)
        return self._answer_text(self.record.answer)

    def random_valid_action(self, rng: random.Random) -> str:
        """A well-formed answer drawn from the training answers: the guessing baseline."""
        return self._answer_text(rng.choice(self.train).answer)

    def observation_texts(self) -> list[str]:
        records = self.train if self.val is self.train else (*self.train, *self.val)
        texts = [self.prompt(r) for r in records]
        texts += ["correct\n", "incorrect\n"]
        if self.tools:  # only replies with tools can fail to parse or call
            texts += ["error: " + "x" * 120 + "\n", "Observation: " + "x" * self.cfg.max_tool_chars + "\n"]
        return texts
