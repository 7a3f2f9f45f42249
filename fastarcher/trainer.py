"""The training loop: rollout → store → critic steps → actor steps → target update → sync → log → save.

    torchrun --standalone --nproc_per_node=2 -m fastarcher.train --algo archer --config configs/tiny_cpu.yaml

ArCHer (Zhou et al. 2024, https://arxiv.org/abs/2402.19446): an utterance-level off-policy double
critic trained from a replay buffer, and a token-level policy trained with A = Q − V after a critic-only
warm-up. The fresh actions a′ ~ π(·|s) that the critic's V targets and the actor need are drawn for a
whole phase at once in large batched engine calls (the policy does not change during the critic
epochs), instead of one generate call per minibatch. Each rank runs its share of the environments and
keeps its own replay shard; policy and critic are FSDP2-sharded when there are several ranks.
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from fastarcher.algos.archer import actor_loss, archer_advantage, critic_loss, critic_targets
from fastarcher.algos.filtered_bc import bc_loss, filter_top_fraction
from fastarcher.algos.reinforce import group_advantages, policy_gradient_loss
from fastarcher.checkpoint import CheckpointError, Checkpointer, ModelState, OptimizerState
from fastarcher.config import TrainConfig, to_dict
from fastarcher.critic import DoubleCritic, make_target, soft_update
from fastarcher.dist import DistInfo, all_reduce_max, on_main, seed_everything
from fastarcher.envs import token_sizes
from fastarcher.envs.runner import BatchedEnvRunner
from fastarcher.guards import StepGuard
from fastarcher.logging import RunLogger, plot_learning_curves
from fastarcher.metrics import reduce_metrics
from fastarcher.model import encode, load_policy, stop_token_id, transformer_blocks
from fastarcher.parallel import data_parallel_mesh, parallelize
from fastarcher.policy import action_logprobs
from fastarcher.random_streams import RandomStreams
from fastarcher.replay import ReplayBuffer, TransitionBatch
from fastarcher.rollout.base import ActionConstraint, SamplingParams
from fastarcher.rollout.collect import (
    RolloutResult, close_utterance, oracle_picker, pad_rows, play_episodes, random_picker, sampled_lengths,
)
from fastarcher.rollout.hf_engine import HFEngine
from fastarcher.rollout.weight_sync import sync_weights
from fastarcher.traces.trainer_hooks import TraceRecorder

EVAL_SEED_OFFSET = 1_000_000_007
"""Evaluation episodes use seeds far from the training stream, the same ones at every evaluation."""


def _mask(lengths: Tensor, width: int) -> Tensor:
    return torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]  # (B, T)


class MetricBag:
    """Collects 0-d tensors during an iteration; converted to floats once, at the logging point.

    `count/*` keys are summed over the iteration, all others averaged."""

    def __init__(self):
        self._values: dict[str, list[Tensor | float]] = {}

    def add(self, metrics: dict[str, Tensor | float]) -> None:
        for key, value in metrics.items():
            self._values.setdefault(key, []).append(value)

    def means(self) -> dict[str, float]:
        out = {}
        for key, values in self._values.items():
            stacked = torch.stack([torch.as_tensor(v, dtype=torch.float64).detach().cpu() for v in values])
            # counts add up over the iteration; everything else is a mean over its steps (sync point)
            out[key] = float(stacked.sum() if key.startswith("count/") else stacked.mean())
        return out


@dataclass
class Progress:
    """Where the run stands (a run-wide checkpoint part): iterations done, the random-policy baseline,
    the evaluation before training and the latest evaluation."""

    iteration: int = 0
    random_baseline: dict[str, float] | None = None
    start_metrics: dict[str, float] | None = None
    last_eval: dict[str, float] | None = None

    checkpoint_scope = "run"

    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "random_baseline": self.random_baseline,
                "start_metrics": self.start_metrics, "last_eval": self.last_eval}

    def load_state_dict(self, state: dict) -> None:
        if type(state["iteration"]) is not int or state["iteration"] < 0:
            raise ValueError(f"progress iteration must be a non-negative integer, got {state['iteration']!r}")
        for key in ("random_baseline", "start_metrics", "last_eval"):
            value = state[key]
            if value is not None and not (isinstance(value, dict) and all(
                    isinstance(k, str) and isinstance(v, (int, float)) for k, v in value.items())):
                raise ValueError(f"progress {key} is not a mapping of metric names to numbers")
        self.iteration, self.random_baseline = state["iteration"], state["random_baseline"]
        self.start_metrics, self.last_eval = state["start_metrics"], state["last_eval"]


class Trainer:
    def __init__(self, cfg: TrainConfig, info: DistInfo):
        self.cfg, self.info = cfg, info
        self.device = info.device
        self.run_dir = Path(cfg.log.run_dir)
        cfg.validate(world_size=info.world_size)  # the entry point's checks, for a Trainer built from Python
        # Identical init on every rank (FSDP2 keeps each rank's shard of its own full copy).
        seed_everything(cfg.seed)
        policy, tokenizer = load_policy(cfg.model)
        cfg.check_env_fits(token_sizes(cfg.env, lambda text: encode(tokenizer, text)))
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id
        self.stop_id = stop_token_id(tokenizer)
        engine_model = copy.deepcopy(policy)
        backbone = policy.model if cfg.critic.encoder == "policy" else None  # one process only (validate)
        critic = DoubleCritic(cfg.critic, vocab_size=len(tokenizer), pad_id=self.pad_id, backbone=backbone)
        target = make_target(critic)
        self.policy, self.critic, self.target = policy.to(self.device), critic.to(self.device), target.to(self.device)
        if info.distributed:
            mesh = data_parallel_mesh(self.device, info.world_size)
            parallelize(self.policy, transformer_blocks(self.policy), mesh)
            parallelize(self.critic, self.critic.encoder_layers(), mesh)
            parallelize(self.target, self.target.encoder_layers(), mesh)
        self.policy.train()
        self.critic.train()
        optim = cfg.optim
        self.actor_opt = torch.optim.AdamW(self.policy.parameters(), lr=optim.actor_lr, weight_decay=optim.weight_decay)
        # with critic.backbone_grad the critic's losses reach the shared policy backbone: the critic optimizer
        # owns those gradients too (steps, clips and zeroes them), so the actor steps its own loss only
        self.critic_modules = self.critic
        if backbone is not None and cfg.critic.backbone_grad:
            self.critic_modules = torch.nn.ModuleDict({"critic": self.critic, "backbone": backbone})
        self.critic_opt = torch.optim.AdamW(self.critic_modules.parameters(), lr=optim.critic_lr,
                                            weight_decay=optim.weight_decay)
        self.engine = HFEngine(engine_model, pad_id=self.pad_id, device=self.device, max_batch=cfg.rollout.max_batch)

        # Per-rank random streams, all derived from the one seed: fresh-action sampling, replay sampling,
        # demonstration picks, minibatch orders of on-policy updates.
        self.streams = RandomStreams(cfg.seed, info.rank, self.device)
        self.sample_gen, self.buffer_gen = self.streams.sample_gen, self.streams.buffer_gen
        self.py_rng, self.cpu_gen = self.streams.py_rng, self.streams.cpu_gen

        self.envs_per_rank = cfg.rollout.num_envs // info.world_size
        self.runner = BatchedEnvRunner(cfg.env, self.envs_per_rank)
        self.eval_runner = BatchedEnvRunner(cfg.env, cfg.eval.episodes // info.world_size)
        self.constraint = None
        if cfg.rollout.constrain_actions:
            sequences = [encode(tokenizer, a) + [self.stop_id] for a in self.runner.action_choices()]
            self.constraint = ActionConstraint(sequences, len(tokenizer))  # fits max_new_tokens (check_env_fits)
        # s′ is rebuilt as the last `state_window` tokens of s ⊕ a ⊕ o, the same window the rollout keeps
        self.state_window = cfg.rollout.context_tokens or cfg.replay.max_state_len
        self.buffer = ReplayBuffer(cfg.replay.capacity, cfg.replay.max_state_len, cfg.replay.max_action_len,
                                   cfg.replay.max_obs_len, pad_id=self.pad_id, device=self.device)
        self.progress = Progress()
        self.logger = RunLogger(
            self.run_dir, is_main=info.is_main, total_iterations=cfg.iterations, progress=cfg.log.progress,
            wandb_config=to_dict(cfg) if cfg.log.wandb else None, wandb_project=cfg.log.wandb_project,
        )
        self.guard = StepGuard(cfg.guard, log=self.logger.print)
        log = lambda message: self.logger.print(message)  # noqa: E731 - late-bound: a replaced logger.print is used
        parts = {
            "policy": ModelState(self.policy), "critic": ModelState(self.critic), "target": ModelState(self.target),
            "actor_opt": OptimizerState(self.policy, self.actor_opt, "actor_opt", log),
            "critic_opt": OptimizerState(self.critic_modules, self.critic_opt, "critic_opt", log),
            "replay": self.buffer, "rng": self.streams, "runner": self.runner, "eval_runner": self.eval_runner,
            "progress": self.progress, "guard": self.guard, "logger": self.logger,
        }
        self.checkpointer = Checkpointer(cfg.checkpoint, self.run_dir, parts, config=to_dict(cfg),
                                         device=self.device.type, rank=info.rank, world_size=info.world_size, log=log)
        # Influence / entropy traces of the actor step (docs/traces.md); inert, no hooks, when both are off.
        self.traces = TraceRecorder(cfg.trace, self.policy, self.run_dir, info, tokenizer, pad_id=self.pad_id,
                                    constraint=self.constraint, log=self.logger.print)

    @property
    def iteration(self) -> int:
        return self.progress.iteration

    @iteration.setter
    def iteration(self, value: int) -> None:
        self.progress.iteration = value

    # ----------------------------------------------------------------------------------------------
    # sampling

    def sampling_params(self, greedy: bool = False) -> SamplingParams:
        r = self.cfg.rollout
        return SamplingParams(temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens,
                              greedy=greedy, stop_token_id=self.stop_id, constraint=self.constraint)

    def train_seeds(self) -> list[int]:
        base = self.cfg.seed * 10_000_019 + self.iteration * self.cfg.rollout.num_envs
        return [base + self.info.rank * self.envs_per_rank + k for k in range(self.envs_per_rank)]

    def eval_seeds(self) -> list[int]:
        n = self.eval_runner.num_envs
        return [EVAL_SEED_OFFSET + self.cfg.seed * 100_003 + self.info.rank * n + k for k in range(n)]

    def play(self, runner: BatchedEnvRunner, seeds: list[int], greedy: bool) -> RolloutResult:
        return play_episodes(runner, seeds, tokenizer=self.tokenizer, stop_id=self.stop_id, engine=self.engine,
                             params=self.sampling_params(greedy), generator=self.sample_gen,
                             context_tokens=self.cfg.rollout.context_tokens)

    def fresh_actions(self, states: TransitionBatch) -> tuple[Tensor, Tensor, Tensor, int]:
        """a′ ~ π(·|s) for every state of the batch, in as few engine calls as max_batch allows:
        (action ids, action lengths, sampled lengths, engine calls). An utterance cut at max_new_tokens
        is closed with a stop token that was not sampled; its sampled length leaves that token out."""
        ids, lens = states.state_ids.tolist(), states.state_len.tolist()
        prompts = [row[:n] for row, n in zip(ids, lens)]
        out = self.engine.generate(prompts, self.sampling_params(), self.sample_gen)
        actions = [close_utterance(a, self.stop_id) for a in out.token_ids]
        action_ids, action_len = pad_rows(actions, self.pad_id)
        sampled_len = sampled_lengths(action_len, self.cfg.rollout.max_new_tokens)
        calls = math.ceil(len(prompts) / self.engine.max_batch)
        return action_ids.to(self.device), action_len.to(self.device), sampled_len.to(self.device), calls

    def sync_engine(self) -> float:
        return sync_weights(self.policy, self.engine, self.cfg.rollout.sync_bucket_mb << 20)["seconds"]

    # ----------------------------------------------------------------------------------------------
    # updates

    def critic_phase(self, bag: MetricBag) -> None:
        a = self.cfg.archer
        micro = a.critic_epochs * a.grad_accum
        batch = self.buffer.sample(a.batch_size * micro, self.buffer_gen)
        fresh_ids, fresh_len, _, calls = self.fresh_actions(batch)
        bag.add({"count/fresh_generate_calls": float(calls)})
        for step in range(a.critic_epochs):
            for k in range(a.grad_accum):
                rows = slice((step * a.grad_accum + k) * a.batch_size, (step * a.grad_accum + k + 1) * a.batch_size)
                mb = _select_rows(batch, rows).trimmed()
                f_ids, f_len = _trim(fresh_ids[rows], fresh_len[rows])
                s_mask = _mask(mb.state_len, mb.state_ids.shape[1])
                a_mask = _mask(mb.action_len, mb.action_ids.shape[1])
                q1, q2, v1, v2 = self.critic(mb.state_ids, s_mask, mb.action_ids, a_mask)
                with torch.no_grad():
                    tq1, tq2, _, _ = self.target(mb.state_ids, s_mask, f_ids, _mask(f_len, f_ids.shape[1]))
                    next_ids, next_len = mb.next_state(self.state_window)
                    _, _, tv1, tv2 = self.target(next_ids, _mask(next_len, next_ids.shape[1]), mb.action_ids, a_mask)
                    y_q1, y_q2, y_v1, y_v2 = critic_targets(
                        reward=mb.reward, done=mb.done, target_v1_next=tv1, target_v2_next=tv2,
                        target_q1_fresh=tq1, target_q2_fresh=tq2, gamma=a.gamma)
                loss, metrics = critic_loss(q1=q1, q2=q2, v1=v1, v2=v2, y_q1=y_q1, y_q2=y_q2, y_v1=y_v1, y_v2=y_v2)
                (loss / a.grad_accum).backward()
                self.guard.track("critic", loss / a.grad_accum)
                bag.add(metrics)
            bag.add({"critic/grad_norm": self.guard.check_and_step(
                "critic", self.critic_opt, max_norm=self.cfg.optim.critic_grad_clip,
                iteration=self.iteration)})
            soft_update(self.target, self.critic, a.tau)

    def actor_phase(self, bag: MetricBag) -> float:
        """ArCHer actor steps; returns the seconds spent syncing the engine after each step."""
        a = self.cfg.archer
        sync_s = 0.0
        for epoch in range(a.actor_epochs):
            step = (self.iteration - a.warmup_iterations) * a.actor_epochs + epoch  # actor step index of the traces
            batch = self.buffer.sample(a.batch_size * a.grad_accum, self.buffer_gen)
            fresh_ids, fresh_len, fresh_sampled, calls = self.fresh_actions(batch)
            bag.add({"count/fresh_generate_calls": float(calls)})
            for k in range(a.grad_accum):
                rows = slice(k * a.batch_size, (k + 1) * a.batch_size)
                mb = _select_rows(batch, rows).trimmed()
                f_ids, f_len = _trim(fresh_ids[rows], fresh_len[rows])
                f_sampled = fresh_sampled[rows]  # f_len less a stop token appended to a cut utterance
                with torch.no_grad():
                    s_mask = _mask(mb.state_len, mb.state_ids.shape[1])
                    q1, q2, v1, v2 = self.critic(mb.state_ids, s_mask, f_ids, _mask(f_len, f_ids.shape[1]))
                    advantage = archer_advantage(q1=q1, q2=q2, v1=v1, v2=v2)
                    if a.advantage_baseline == "batch_mean":
                        advantage = advantage - advantage.mean()
                    if a.normalize_advantage:
                        advantage = advantage / (advantage.std(correction=0) + 1e-6)
                # the traces see the scored tokens only, as the loss does
                with self.traces.actor_micro_batch(step, mb.state_ids, mb.state_len, f_ids, f_sampled,
                                                   advantage=advantage,
                                                   q_value=torch.minimum(q1, q2)) as trace:  # forward + backward inside
                    logprob_sum, entropy = self._logprobs(mb.state_ids, mb.state_len, f_ids, f_len, trace=trace,
                                                          sampled_len=f_sampled)
                    loss, metrics = actor_loss(logprob_sum=logprob_sum, advantage=advantage, entropy=entropy,
                                               entropy_coeff=a.entropy_coeff)
                    (loss / a.grad_accum).backward()
                self.guard.track("actor", loss / a.grad_accum)
                bag.add(metrics)
            bag.add(self.traces.finish_step(step))  # {} unless a trace is due at this step
            bag.add({"actor/grad_norm": self.guard.check_and_step(
                "actor", self.actor_opt, max_norm=self.cfg.optim.actor_grad_clip,
                iteration=self.iteration)})
            sync_s += self.sync_engine()  # the next epoch samples a′ from the updated policy
        return sync_s

    def _logprobs(self, state_ids, state_len, action_ids, action_len, trace=None,
                  sampled_len=None) -> tuple[Tensor, Tensor]:
        """Σ log π over the sampled tokens of each utterance (B,) and their entropy Σ_h H_h (B,)."""
        logprob_sum, token_entropy, action_mask = action_logprobs(
            self.policy, state_ids, state_len, action_ids, action_len, pad_id=self.pad_id, constraint=self.constraint,
            sampled_len=sampled_len)
        if trace is not None:  # a traced actor micro-batch: the entropy trace wants every token's entropy
            trace.set_token_entropy(token_entropy)
        # Utterance entropy: the sum of the per-token conditional entropies along the utterance (a
        # per-token mean would be diluted by forced tokens such as the stop token of a fixed action set).
        entropy = (token_entropy * action_mask).sum(-1)
        return logprob_sum, entropy

    def on_policy_phase(self, transitions: TransitionBatch, weights: Tensor, bag: MetricBag, kind: str) -> None:
        """reinforce (weights = advantages) or filtered_bc / warm start (weights = keep mask) over the
        given transitions, in minibatches; every rank takes the same number of optimizer steps."""
        b = self.cfg.archer.batch_size
        n = len(transitions)
        steps = int(all_reduce_max(torch.tensor([math.ceil(n / b)], dtype=torch.long))[0])
        epochs = self.cfg.baseline.update_epochs if kind == "reinforce" else 1
        for _ in range(epochs):
            order = torch.randperm(max(n, 1), generator=self.cpu_gen)
            for step in range(steps):
                rows = order[(torch.arange(step * b, (step + 1) * b)) % max(n, 1)]
                self._policy_step(transitions, rows, weights, bag, kind, self.actor_opt, self.cfg.optim.actor_grad_clip,
                                  sampled=True)

    def _policy_step(self, transitions, rows, weights, bag, kind, optimizer, clip, *, sampled: bool) -> None:
        """One optimizer step on the weighted Σ log π of the given rows. `sampled`: the actions came from
        the engine, so an utterance longer than max_new_tokens was cut and closed with a stop token that was
        never sampled (close_utterance): only its first max_new_tokens tokens are scored. Demonstrations
        (warm start) are scored whole."""
        mb = _select_rows(transitions, rows.to(transitions.state_ids.device)).to(self.device).trimmed()
        w = weights[rows].to(self.device)
        sampled_len = sampled_lengths(mb.action_len, self.cfg.rollout.max_new_tokens) if sampled else None
        logprob_sum, entropy = self._logprobs(mb.state_ids, mb.state_len, mb.action_ids, mb.action_len,
                                              sampled_len=sampled_len)
        if kind == "reinforce":
            loss, metrics = policy_gradient_loss(logprob_sum=logprob_sum, advantage=w)
        else:
            loss, metrics = bc_loss(logprob_sum=logprob_sum, mask=w.bool())
        loss.backward()
        metrics = {**metrics, "actor/entropy": entropy.detach().mean()}
        bag.add(metrics)
        bag.add({"actor/grad_norm": self.guard.check_and_step("actor", optimizer, max_norm=clip,
                                                              iteration=self.iteration, loss=loss)})

    # ----------------------------------------------------------------------------------------------
    # phases of a run

    def warm_start(self) -> None:
        """Supervised steps on demonstrations (random valid actions or the oracle) before RL."""
        ws = self.cfg.warm_start
        picker = oracle_picker if ws.demos == "oracle" else random_picker(self.py_rng)
        runner = BatchedEnvRunner(self.cfg.env, ws.episodes)
        seeds = [-(1 + self.info.rank * ws.episodes + k) for k in range(ws.episodes)]
        demos = play_episodes(runner, seeds, tokenizer=self.tokenizer, stop_id=self.stop_id, picker=picker,
                              context_tokens=self.cfg.rollout.context_tokens)
        transitions = demos.transitions(self.cfg.archer.gamma, self.pad_id)
        optimizer = torch.optim.AdamW(self.policy.parameters(), lr=ws.lr)
        keep = torch.ones(len(transitions))
        self.logger.print(f"warm start: {ws.steps} steps on {len(transitions)} {ws.demos} demonstration turns per rank")
        for step in range(ws.steps):
            bag = MetricBag()
            rows = torch.randint(len(transitions), (ws.batch_size,), generator=self.cpu_gen)
            self._policy_step(transitions, rows, keep, bag, "bc", optimizer, 1.0, sampled=False)
            if (step + 1) % max(ws.steps // 5, 1) == 0 or step + 1 == ws.steps:
                m = reduce_metrics(bag.means(), self.info.world_size)
                self.logger.print(f"  warm start step {step + 1}/{ws.steps}  nll {m['actor/bc_loss']:.3f}")
        self.sync_engine()

    def evaluate(self) -> dict[str, float]:
        was_gen = self.sample_gen.get_state()
        result = self.play(self.eval_runner, self.eval_seeds(), greedy=True)
        self.sample_gen.set_state(was_gen)  # greedy eval must not shift the training sampling stream
        return {k: v for k, v in result.stats("eval").items() if not k.startswith("count/")}

    def evaluate_random(self) -> dict[str, float]:
        rng = random.Random(self.cfg.seed + 31 * self.info.rank)
        n = self.cfg.eval.random_episodes // self.info.world_size
        seeds = [EVAL_SEED_OFFSET + self.cfg.seed * 100_003 + self.info.rank * n + k for k in range(n)]
        result = play_episodes(BatchedEnvRunner(self.cfg.env, n), seeds, tokenizer=self.tokenizer,
                               stop_id=self.stop_id, picker=random_picker(rng))
        stats = result.stats("random")
        return reduce_metrics({k: v for k, v in stats.items() if not k.startswith("count/")}, self.info.world_size)

    def iterate(self) -> dict[str, float]:
        cfg, a = self.cfg, self.cfg.archer
        bag = MetricBag()
        t0 = time.perf_counter()
        rollout = self.play(self.runner, self.train_seeds(), greedy=False)
        transitions = rollout.transitions(a.gamma, self.pad_id)
        if len(transitions):
            self.buffer.add(transitions.to(self.device))
        t_rollout = time.perf_counter() - t0
        metrics = rollout.stats("rollout")
        metrics["perf/tokens_per_s"] = rollout.generated_tokens / max(t_rollout, 1e-9)
        metrics["count/rollout_engine_forwards"] = float(rollout.engine_calls)
        t_critic = t_actor = t_sync = 0.0
        if cfg.algo == "archer":
            t1 = time.perf_counter()
            self.critic_phase(bag)
            t_critic = time.perf_counter() - t1
            if self.iteration >= a.warmup_iterations and a.actor_epochs > 0:
                t2 = time.perf_counter()
                t_sync = self.actor_phase(bag)
                t_actor = time.perf_counter() - t2 - t_sync
        elif cfg.algo in ("reinforce", "filtered_bc"):
            t2 = time.perf_counter()
            if cfg.algo == "reinforce":
                weights = group_advantages(transitions.mc_return, None, normalize_std=cfg.baseline.normalize_std)
            else:
                weights = self._filtered_turns(rollout)
            self.on_policy_phase(transitions, weights, bag, cfg.algo)
            t_sync = self.sync_engine()
            t_actor = time.perf_counter() - t2 - t_sync
        metrics.update({"time/rollout_s": t_rollout, "time/critic_s": t_critic, "time/actor_s": t_actor,
                        "time/sync_s": t_sync, "replay/size": float(len(self.buffer))})
        metrics.update(bag.means())
        metrics.update(self.guard.metrics())
        return metrics

    def _filtered_turns(self, rollout: RolloutResult) -> Tensor:
        """Keep mask over this iteration's turns: all turns of the top episodes by return."""
        kept = rollout.kept()
        returns = torch.tensor([e.total_reward for e in kept], dtype=torch.float32)
        top = filter_top_fraction(returns, self.cfg.baseline.filter_fraction).tolist()
        return torch.tensor([float(keep) for e, keep in zip(kept, top) for _ in e.turns])

    def fit(self) -> dict[str, float]:
        cfg, info = self.cfg, self.info
        self.logger.print(f"fastarcher: algo={cfg.algo} env={cfg.env.name} ranks={info.world_size} "
                          f"device={self.device} policy={_count(self.policy):,} params "
                          f"critic={_count(self.critic):,} params")
        self.logger.print(self.buffer.describe())
        resumed = self.checkpointer.restore() is not None
        if resumed:
            self.sync_engine()  # the rollout engine's copy of the restored policy
        else:
            on_main(lambda: self.logger.start_fresh(keep_earlier=cfg.checkpoint.resume == "none"),
                    f"cannot start the metrics file in {self.run_dir}", CheckpointError)
        if cfg.warm_start.steps and not resumed:
            self.warm_start()
        if cfg.algo == "sft":
            final = reduce_metrics(self.evaluate(), info.world_size)
            self.logger.log(0, final, advance=False)
            return final
        if not resumed:
            if cfg.eval.random_baseline:
                baseline = self.progress.random_baseline = self.evaluate_random()
                self.logger.print("random valid-action policy: success {:.3f} return {:+.3f}".format(
                    baseline["random/success_rate"], baseline["random/return_mean"]))
            self.progress.start_metrics = self.progress.last_eval = reduce_metrics(self.evaluate(), info.world_size)
            self.logger.log(self.iteration, self.progress.start_metrics, advance=False)
        start = self.progress.start_metrics
        run_start = time.perf_counter()
        while self.iteration < cfg.iterations:
            metrics = self.iterate()
            self.iteration += 1
            if cfg.eval.every and self.iteration % cfg.eval.every == 0 or self.iteration == cfg.iterations:
                metrics.update(self.evaluate())
            metrics = reduce_metrics(metrics, info.world_size)
            if "eval/success_rate" in metrics:
                self.progress.last_eval = {k: v for k, v in metrics.items() if k.startswith("eval/")}
            self.logger.log(self.iteration, metrics)
            self.checkpointer.maybe_save(self.iteration, last=self.iteration >= cfg.iterations)
        last_eval = self.progress.last_eval
        summary = {
            "start/eval_success_rate": start["eval/success_rate"],
            "final/eval_success_rate": last_eval["eval/success_rate"],
            "start/eval_return": start["eval/return_mean"],
            "final/eval_return": last_eval["eval/return_mean"],
            "train_seconds": time.perf_counter() - run_start,
        }
        if self.progress.random_baseline:
            summary["random/success_rate"] = self.progress.random_baseline["random/success_rate"]
            summary["random/return_mean"] = self.progress.random_baseline["random/return_mean"]
        return summary

    def save_final(self) -> None:
        """The end of a run: a checkpoint of the last iteration (if not saved already) and the HF export."""
        self.checkpointer.save_final(self.iteration)
        if self.cfg.checkpoint.export_hf:
            from fastarcher.export import export_policy

            out = export_policy(self.policy, self.tokenizer, self.run_dir / "hf_policy")
            self.logger.print(f"export: policy saved as a Hugging Face folder in {out}")

    def finish(self, summary: dict[str, float]) -> None:
        if self.info.is_main and self.logger.history:
            rb = self.progress.random_baseline or {}
            plot_learning_curves(self.logger.history, self.run_dir / "learning_curve.png",
                                 random_success=rb.get("random/success_rate"), random_return=rb.get("random/return_mean"),
                                 title=f"{self.cfg.algo} on {self.cfg.env.name}")
        self.traces.close()
        self.logger.close()


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _select_rows(batch: TransitionBatch, rows: slice | Tensor) -> TransitionBatch:
    return TransitionBatch(**{f: getattr(batch, f)[rows] for f in TransitionBatch.tensor_fields()}, pad_id=batch.pad_id)


def _trim(ids: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    return ids[:, : max(int(lengths.max()), 1)], lengths
