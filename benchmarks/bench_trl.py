"""End to end against TRL's GRPOTrainer: completion tokens per second of whole training steps, side by side.

    pip install -c constraints.txt -e ".[bench]"      # trl, under the same torch
    python benchmarks/bench_trl.py [--steps 12] [--rounds 2] [--size tiny|wide]
    pytest benchmarks/bench_trl.py --benchmark-only    # one short round (skipped without trl)

Fairness rules (both sides, checked or set here):
- the same model: one random-init Llama saved to a temporary folder with the built-in tokenizer, loaded by
  both from that folder, float32, sdpa attention, one torch thread each;
- the same task and reward: prompts are the `qa` env's (examples/data/sums.jsonl, "What is a + b?") and
  TRL's reward function scores each completion with that env's own `step` (math_equiv);
- the same step: 64 completions per optimizer step, in groups of 8 (GRPO: fastarcher `--algo grpo
  --rollout.group-size 8`, TRL `num_generations=8`), one optimizer step per batch (fastarcher
  `--archer.batch-size 64`, TRL `per_device_train_batch_size=64`, `num_iterations=1`), at most 8 new
  tokens, sampling at temperature 1, no KL term (beta 0), no gradient checkpointing, AdamW lr 1e-5;
- per completion token: generated tokens / wall seconds of the whole step (generation, reward, loss,
  backward, optimizer, weight sync), the first step of each run excluded (warm-up);
- fastarcher's step time is `time/iteration_s`, its tokens `count/rollout_generated_tokens`; TRL's step
  time is measured by a callback from `on_step_begin` to `on_step_end`, its tokens are
  `completions/mean_length` × 64 from its own logs;
- runs take turns (fastarcher, TRL, fastarcher, ...), medians over rounds of the per-run rates.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "examples" / "data" / "sums.jsonl"
COMPLETIONS, GROUP, MAX_NEW = 64, 8, 8
SIZES = {"tiny": dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256),
         "wide": dict(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024)}


def save_model(folder: Path, size: str) -> None:
    import torch

    from fastarcher.config import ModelConfig
    from fastarcher.model import build_builtin_model, build_builtin_tokenizer

    torch.manual_seed(0)
    tokenizer = build_builtin_tokenizer()
    model = build_builtin_model(ModelConfig(**SIZES[size]), len(tokenizer), tokenizer.pad_token_id,
                                tokenizer.eos_token_id)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def run_fastarcher(model_dir: Path, steps: int, out: Path) -> float:
    """Completion tokens per second over steps 2..steps of `--algo grpo`."""
    cmd = [sys.executable, "-m", "fastarcher.train", "--algo", "grpo", "--model.path", str(model_dir),
           "--env.name", "qa", "--env.qa.train-files", str(DATA), "--env.qa.reward", "math_equiv",
           "--rollout.num-envs", str(COMPLETIONS), "--rollout.group-size", str(GROUP),
           "--rollout.max-new-tokens", str(MAX_NEW), "--rollout.no-constrain-actions",
           "--archer.batch-size", str(COMPLETIONS), "--baseline.update-epochs", "1", "--optim.actor-lr", "1e-5",
           "--iterations", str(steps), "--eval.every", "0", "--eval.episodes", "1", "--eval.no-random-baseline",
           "--warm-start.steps", "0", "--log.run-dir", str(out), "--log.no-progress", "--device", "cpu"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, env=_env(), cwd=REPO)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["iteration"] >= 2 and "time/iteration_s" in r]
    return sum(r["count/rollout_generated_tokens"] for r in rows) / sum(r["time/iteration_s"] for r in rows)


def run_trl(model_dir: Path, steps: int, out: Path) -> float:
    """The same in a fresh process through TRL (this file with --trl-worker)."""
    proc = subprocess.run([sys.executable, __file__, "--trl-worker", str(model_dir), str(steps), str(out)],
                          check=True, capture_output=True, text=True, env=_env(), cwd=REPO)
    return json.loads(proc.stdout.strip().splitlines()[-1])["tokens_per_s"]


def trl_worker(model_dir: str, steps: int, out: str) -> None:
    import time

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from fastarcher.envs.qa import QA, QAConfig

    torch.set_num_threads(1)
    env = QA(QAConfig(train_files=(str(DATA),), reward="math_equiv"))
    prompts = [env.reset(seed) for seed in range(512)]
    answers = {p: None for p in prompts}

    def reward(prompts, completions, **_):
        scores = []
        for prompt, completion in zip(prompts, completions):
            env.record = next(r for r in env.train if env.prompt(r) == prompt)
            env._turn, env._done = 0, False
            scores.append(env.step(completion)[1])
        return scores

    step_times, lengths = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            step_times.append(time.perf_counter() - self.t0)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    config = GRPOConfig(
        output_dir=out, per_device_train_batch_size=COMPLETIONS, num_generations=GROUP,
        max_completion_length=MAX_NEW, num_iterations=1, beta=0.0, learning_rate=1e-5, temperature=1.0,
        gradient_checkpointing=False, use_cpu=True, bf16=False, fp16=False, logging_steps=1, max_steps=steps,
        save_strategy="no", report_to=[], seed=0, dataloader_num_workers=0, disable_tqdm=True)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, processing_class=tokenizer,
                          train_dataset=Dataset.from_dict({"prompt": list(answers)}), callbacks=[Timer()])
    trainer.train()
    tokens = [length * COMPLETIONS for length in lengths[1:]]
    print(json.dumps({"tokens_per_s": sum(tokens) / sum(step_times[1:]), "steps": len(step_times),
                      "mean_length": statistics.mean(lengths)}))


def compare(size: str, steps: int, rounds: int) -> dict[str, list[float]]:
    rates: dict[str, list[float]] = {"trl": [], "fastarcher": []}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        save_model(model_dir, size)
        for r in range(rounds):
            rates["fastarcher"].append(run_fastarcher(model_dir, steps, Path(tmp) / f"fa{r}"))
            rates["trl"].append(run_trl(model_dir, steps, Path(tmp) / f"trl{r}"))
    return rates


def test_trl_grpo_end_to_end(ratio_table):
    pytest.importorskip("trl")
    rates = compare("tiny", steps=4, rounds=1)
    for name, values in rates.items():
        rate = statistics.median(values)
        ratio_table.record("end_to_end_vs_trl[tiny, 64x8 tokens]", name, baseline="trl", time_s=1.0 / rate,
                           peak_mib=None, note=f"{rate:.0f} completion tokens/s")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--trl-worker":
        trl_worker(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    args = parser.parse_args()
    rates = compare(args.size, args.steps, args.rounds)
    trl, ours = statistics.median(rates["trl"]), statistics.median(rates["fastarcher"])
    print(f"model {args.size} {SIZES[args.size]}; {args.steps} steps per run (first excluded), {args.rounds} rounds")
    print("| trainer | completion tokens/s (per round) | median | × TRL |")
    print("|---|---|---|---|")
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"| {name} | {', '.join(f'{v:.0f}' for v in values)} | {median:.0f} | {median / trl:.2f} |")
    print(f"fastarcher / TRL: {ours / trl:.2f}x")


if __name__ == "__main__":
    main()
