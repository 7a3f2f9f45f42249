"""Typed configuration: one dataclass per part, nested in `TrainConfig`, turned into flags by tyro.

A YAML preset (`--config configs/tiny_cpu.yaml`) fills the defaults first; any flag given on the
command line overrides it. `TrainConfig.validate()` checks cross-field rules before any work starts and
names the field to change.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from fastarcher.critic import CriticConfig
from fastarcher.envs import EnvConfig, TokenSizes
from fastarcher.model import ModelConfig
from fastarcher.schedule import lr_multiplier
from fastarcher.traces.config import TraceConfig

KL_ALGOS = ("archer", "reinforce", "grpo", "rloo", "reinforce_pp", "remax", "ppo")
"""Algorithms that take a KL toward a reference policy (--kl.coef)."""

Algo = Literal["archer", "chai", "reinforce", "grpo", "rloo", "reinforce_pp", "remax", "ppo", "filtered_bc", "sft"]

REPLAY_ALGOS = ("archer", "chai")
"""Algorithms with a replay buffer (off-policy), the ones that can take demonstrations into it."""


def cuda_visible() -> bool:
    """A CUDA GPU is visible (one place, so tests can drive the GPU-only engine's loop with a stand-in)."""
    return torch.cuda.is_available()


@dataclass(kw_only=True)
class RolloutConfig:
    engine: Literal["hf", "sglang"] = "hf"
    """Rollout engine: 'hf' (transformers, KV cache; the CPU default); 'sglang' (one engine per GPU beside
    training, memory released while training; needs CUDA, the sglang package and unconstrained actions;
    docs/sglang.md)."""
    sglang_mem_fraction: float = 0.5
    """sglang's `mem_fraction_static`: the share of GPU memory for its weights and KV cache while it runs
    (released during training). Lower it when resuming the engine runs out of memory."""
    num_envs: int = 50
    """Episodes collected per iteration, over all ranks (ArCHer's rollout_size)."""
    group_size: int = 1
    """Episodes played from each env seed (GRPO / RLOO groups, verl's rollout.n); num_envs / processes must
    be a multiple of it, so that no group straddles two processes."""
    share_prompts: bool = True
    """group_size > 1: prefill each group's prompt once in the HF engine (same tokens) and score each distinct
    state once in the policy's forward (same values, gradients to float32 rounding); off: every row whole."""
    temperature: float = 1.0
    """Sampling temperature for training rollouts and fresh actions a′."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0 = off)."""
    max_new_tokens: int = 16
    """Longest utterance; generation also stops at the newline stop token."""
    constrain_actions: bool = True
    """Decode only the environment's declared action set (prefix-constrained sampling); log-probs in
    training are those of the same constrained distribution."""
    max_batch: int = 256
    """Largest batch one engine forward handles (larger requests are split)."""
    sync_bucket_mb: int = 64
    """Bucket size when pushing FSDP shards into the engine after an actor update."""
    context_tokens: int = 0
    """The policy and the critic see only the last this many tokens of the dialogue (0: all of it).
    For envs whose observation holds the whole state (FrozenLake, Sokoban) a window of one turn keeps
    states short; at most replay.max_state_len."""
    kv_cache: bool = True
    """Keep each episode's KV cache between turns and feed only the tokens a turn adds (same tokens and
    log-probs as prefilling the whole dialogue again). A row whose context window slid is prefilled again."""

    def validate(self) -> None:
        if self.engine == "sglang":
            if self.constrain_actions:
                raise ValueError("rollout.engine sglang samples freely (it cannot apply the action-prefix table): "
                                 "add --rollout.no-constrain-actions, or use --rollout.engine hf")
            if not 0 < self.sglang_mem_fraction < 1:
                raise ValueError(f"rollout.sglang_mem_fraction ({self.sglang_mem_fraction}) must be in (0, 1)")
        _positive(self, "rollout", "num_envs", "group_size", "max_new_tokens", "max_batch", "sync_bucket_mb")
        _non_negative(self, "rollout", "context_tokens")
        if self.temperature <= 0:
            raise ValueError(f"rollout.temperature ({self.temperature}) must be > 0 (use eval greedy for argmax)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"rollout.top_p ({self.top_p}) must be in (0, 1]")


@dataclass(kw_only=True)
class ReplayConfig:
    capacity: int = 100_000
    """Transitions kept per rank (oldest overwritten first)."""
    max_state_len: int = 512
    """Longest stored state in tokens; longer dialogues keep their last tokens."""
    max_action_len: int = 16
    """Longest stored utterance in tokens (at least rollout.max_new_tokens; one more without the action
    constraint, since a cut utterance is closed with the stop token)."""
    max_obs_len: int = 128
    """Longest stored observation in tokens."""

    def validate(self) -> None:
        _positive(self, "replay", "capacity", "max_state_len", "max_action_len", "max_obs_len")


@dataclass(kw_only=True)
class ArcherConfig:
    warmup_iterations: int = 20
    """Iterations that train only the critic before the actor starts."""
    critic_epochs: int = 3
    """Critic optimizer steps per iteration (each on batch_size × grad_accum transitions)."""
    actor_epochs: int = 3
    """Actor optimizer steps per iteration after warm-up."""
    batch_size: int = 32
    """Transitions per micro-batch per rank."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; the loss is averaged over them, so the learning rate applies to
    the mean gradient of batch_size × grad_accum transitions per rank (× world size overall)."""
    gamma: float = 0.99
    """Utterance-level discount."""
    tau: float = 0.1
    """Polyak rate of the target critic after every critic optimizer step."""
    mc_mix: float = 0.0
    """Mix the replayed episode's Monte-Carlo return G into the Q targets: y_Q = (1 − λ)(r + γ V̄(s′)) + λ G
    (0: the reference's one-step TD). A sparse final reward then reaches early turns in one step instead of
    one turn per target update, at the price of the behaviour policy's bias (docs/archer.md)."""
    entropy_coeff: float = 0.001
    """Weight of the token entropy bonus in the actor loss."""
    advantage_baseline: Literal["none", "batch_mean"] = "none"
    """Subtract the batch mean from A = Q − V before the actor loss ('none' is the reference code).
    E[c·∇log π(a′|s)] = 0 for a constant c, so the expected gradient is unchanged; what goes away is
    the drift that a critic offset (min Q vs min V) would otherwise push along all sampled actions."""
    normalize_advantage: bool = False
    """Divide actor advantages by their batch std (off in the reference code)."""
    token_baseline: bool = False
    """ArCHer with a token-level baseline: a token value model b_h (the policy's architecture with a value
    head, trained with optim.critic_lr) regresses to the utterance advantage A, and the actor's gradient
    uses A − b_h at every token (the paper's token-level variant)."""

    def validate(self) -> None:
        _positive(self, "archer", "critic_epochs", "batch_size", "grad_accum")
        _non_negative(self, "archer", "warmup_iterations", "actor_epochs", "entropy_coeff")
        if not 0 <= self.gamma <= 1:
            raise ValueError(f"archer.gamma ({self.gamma}) must be in [0, 1]")
        if not 0 < self.tau <= 1:
            raise ValueError(f"archer.tau ({self.tau}) must be in (0, 1]")
        if not 0 <= self.mc_mix <= 1:
            raise ValueError(f"archer.mc_mix ({self.mc_mix}) must be in [0, 1]")


@dataclass(kw_only=True)
class BaselineConfig:
    filter_fraction: float = 0.3
    """filtered_bc: fraction of the episodes (highest return) to imitate."""
    filter_over: Literal["all", "iteration"] = "all"
    """filtered_bc: rank every episode played so far (the ArCHer paper's baseline) or only the iteration's."""
    filter_capacity: int = 100_000
    """filtered_bc over 'all': most turns of top episodes kept per process (the worst are dropped first)."""
    normalize_std: bool = False
    """reinforce: divide advantages by the return std (GRPO-style)."""
    group_std: bool = True
    """grpo: divide each group's advantages by its return std (GRPO); off is Dr. GRPO."""
    length_norm: bool = False
    """reinforce / grpo / rloo / remax: weigh each utterance's mean token log-prob (GRPO's 1/|o| Σ_t) instead of
    its sum (the default: Dr. GRPO's unbiased form, long and short utterances alike)."""
    episode_weighting: bool = False
    """grpo / rloo / remax: weigh every episode the same in the loss (its turns share its weight) instead of
    every turn (the default, verl / RAGEN's trajectory-level credit); see on_policy.turn_weights."""
    update_epochs: int = 1
    """reinforce / grpo / rloo / reinforce_pp: passes over each iteration's rollouts."""
    token_gamma: float = 1.0
    """reinforce_pp: discount per generated token of the token-level return (observations are not steps)."""
    clip_ratio: float = 0.2
    """reinforce_pp: PPO clip ε of the ratio π/π_old (π_old: the policy that played the iteration)."""

    def validate(self) -> None:
        if not 0 < self.filter_fraction <= 1:
            raise ValueError(f"baseline.filter_fraction ({self.filter_fraction}) must be in (0, 1]")
        _positive(self, "baseline", "update_epochs", "filter_capacity")
        if not 0 <= self.token_gamma <= 1:
            raise ValueError(f"baseline.token_gamma ({self.token_gamma}) must be in [0, 1]")
        if not 0 < self.clip_ratio < 1:
            raise ValueError(f"baseline.clip_ratio ({self.clip_ratio}) must be in (0, 1)")


@dataclass(kw_only=True)
class ChaiConfig:
    samples: int = 4
    """chai: utterances the frozen policy proposes per turn; the one with the highest min(Q1, Q2) is played."""

    def validate(self) -> None:
        _positive(self, "chai", "samples")


@dataclass(kw_only=True)
class PPOConfig:
    estimator: Literal["gae", "bilevel_gae", "archer"] = "gae"
    """Advantage estimator over each episode's sampled tokens (fastarcher/algos/estimators.py): token-level GAE,
    RAGEN's bi-level GAE (turn level with high_level_gamma, then tokens inside each turn), or RAGEN's archer
    mix of token values and turn-level returns (without RAGEN's double count)."""
    gamma: float = 1.0
    """Discount per sampled token (observations are not steps)."""
    lam: float = 0.95
    """GAE λ (both levels of bilevel_gae)."""
    high_level_gamma: float = 0.95
    """bilevel_gae / archer: discount per turn of the turn-level GAE."""
    archer_alpha: float = 0.5
    """archer: weight of the turn-level return in the mixed token value."""
    epochs: int = 2
    """Passes over each iteration's turns, in minibatches of archer.batch_size turns."""
    clip_ratio: float = 0.2
    """Clip ε of the ratio π/π_old (π_old: the policy that played the iteration)."""
    clip_ratio_high: float | None = None
    """Upper clip ε (DAPO's clip-higher); None = clip_ratio."""
    dual_clip: float | None = None
    """Dual clip c > 1 for negative advantages (Ye et al. 2020); None = off."""
    value_clip: float | None = 0.5
    """Clip of the value update around the iteration's values (PPO2); None = off."""
    normalize_advantage: bool = True
    """Whiten the advantages over the iteration's sampled tokens on each process."""
    value_model: Literal["separate", "policy"] = "separate"
    """'separate': a value model of the policy's architecture with a value head, its trunk started from the
    policy (verl's critic); 'policy': a value head on the policy's own trunk, reading its hidden states
    without a gradient into it (one process only)."""
    loss_agg: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"] = "token-mean"
    """How per-token losses become a minibatch loss (verl's loss_agg_mode)."""
    target_kl: float | None = None
    """Stop the iteration's remaining policy (and value) steps once a minibatch's approximate KL(π_old‖π)
    (the k3 estimate, the largest over processes) exceeds this; None = off (the epochs always run)."""

    def validate(self) -> None:
        if self.target_kl is not None and not self.target_kl > 0:
            raise ValueError(f"ppo.target_kl ({self.target_kl}) must be positive (or unset for no limit)")
        for name in ("gamma", "lam", "high_level_gamma", "archer_alpha"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"ppo.{name} ({getattr(self, name)}) must be in [0, 1]")
        _positive(self, "ppo", "epochs")
        if not 0 < self.clip_ratio < 1:
            raise ValueError(f"ppo.clip_ratio ({self.clip_ratio}) must be in (0, 1)")
        if self.clip_ratio_high is not None and self.clip_ratio_high <= 0:
            raise ValueError(f"ppo.clip_ratio_high ({self.clip_ratio_high}) must be positive")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ValueError(f"ppo.dual_clip ({self.dual_clip}) must be above 1")
        if self.value_clip is not None and self.value_clip <= 0:
            raise ValueError(f"ppo.value_clip ({self.value_clip}) must be positive")


@dataclass(kw_only=True)
class OptimConfig:
    actor_lr: float = 1e-5
    """Actor (policy) AdamW learning rate."""
    critic_lr: float = 1e-3
    """Critic AdamW learning rate."""
    actor_grad_clip: float = 0.01
    """Max global grad norm of the actor (0 = no clipping)."""
    critic_grad_clip: float = 1.0
    """Max global grad norm of the critic (0 = no clipping)."""
    weight_decay: float = 0.0
    """AdamW weight decay for both optimizers."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate schedule of both optimizers over the run's iterations (after lr_warmup_iterations
    of linear warm-up); linear and cosine decay to min_lr_ratio × lr at the last iteration."""
    lr_warmup_iterations: int = 0
    """Iterations of linear learning-rate warm-up (lr × (i + 1) / N at iteration i < N)."""
    min_lr_ratio: float = 0.0
    """Floor of the linear / cosine schedules, as a fraction of the base learning rate."""

    def validate(self) -> None:
        _positive(self, "optim", "actor_lr", "critic_lr")
        _non_negative(self, "optim", "actor_grad_clip", "critic_grad_clip", "weight_decay", "lr_warmup_iterations")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio ({self.min_lr_ratio}) must be in [0, 1]")

    @property
    def scheduled(self) -> bool:
        """False for a constant lr without warm-up: then the optimizers' learning rates are left alone."""
        return self.lr_schedule != "constant" or self.lr_warmup_iterations > 0

    def lr_multiplier(self, iteration: int, iterations: int) -> float:
        """The factor on both base learning rates during `iteration` (0-based) of a run of `iterations`:
        a pure function of the iteration, so a resumed run continues on the same schedule."""
        if not self.scheduled:
            return 1.0
        return lr_multiplier(iteration, total_steps=iterations, warmup_steps=min(self.lr_warmup_iterations, iterations),
                             kind=self.lr_schedule, min_ratio=self.min_lr_ratio)


@dataclass(kw_only=True)
class KLConfig:
    coef: float = 0.0
    """β, the weight of the KL toward a frozen reference policy (the policy as RL starts, after any warm
    start); 0 = no KL and no reference policy built. Policy-gradient algorithms (archer's actor included:
    on its fresh actions, in the loss), not chai or filtered_bc."""
    estimator: Literal["kl", "abs", "mse", "low_var_kl", "full"] = "low_var_kl"
    """Per-token estimator (fastarcher/algos/kl.py): kl (k1), abs, mse (k2), low_var_kl (k3), full (exact,
    over the vocabulary)."""
    placement: Literal["loss", "reward"] = "loss"
    """'loss': + β·mean_tokens KL in the policy loss (GRPO, verl use_kl_loss); 'reward': −β·KL subtracted from
    the reward of every generated token before the advantages (PPO/RLHF, REINFORCE++, verl use_kl_in_reward)."""
    adaptive: bool = False
    """Adapt β toward kl.target after every iteration (Ziegler et al. 2019); else β stays kl.coef."""
    target: float = 0.1
    """adaptive: the KL per generated token that β is steered to."""
    horizon: int = 10_000
    """adaptive: episodes over which β may move by ±20%."""

    def validate(self) -> None:
        _non_negative(self, "kl", "coef")
        _positive(self, "kl", "target", "horizon")


@dataclass(kw_only=True)
class WarmStartConfig:
    steps: int = 0
    """Supervised steps on demonstrations before RL (0 = none); stands in for ArCHer's BC start."""
    demos: Literal["random", "oracle"] = "random"
    """Demonstrations: random valid actions (teaches the format only) or the env's oracle."""
    batch_size: int = 64
    """Demonstration transitions per step per rank."""
    lr: float = 1e-3
    """Learning rate of the warm start."""
    episodes: int = 512
    """Demonstration episodes generated per rank."""
    to_replay: bool = False
    """Also write the demonstration turns into the replay buffer (algorithms with one: archer, chai), so the
    off-policy critic learns from them from the first iteration; on-policy algorithms cannot use them."""

    def validate(self) -> None:
        _non_negative(self, "warm_start", "steps")
        _positive(self, "warm_start", "batch_size", "lr", "episodes")


@dataclass(kw_only=True)
class EvalConfig:
    every: int = 5
    """Evaluate every N iterations (and before the first and after the last); 0 = only at the ends."""
    episodes: int = 64
    """Greedy evaluation episodes over all ranks (fixed seeds, disjoint from training seeds)."""
    random_baseline: bool = True
    """Also evaluate a uniformly random valid-action policy once, for reference."""
    random_episodes: int = 1024
    """Episodes over all ranks for the random-policy reference (cheap: no model calls)."""

    def validate(self) -> None:
        _non_negative(self, "eval", "every")
        _positive(self, "eval", "episodes", "random_episodes")


@dataclass(kw_only=True)
class LogConfig:
    run_dir: str = "runs/latest"
    """Folder for metrics.jsonl, config.yaml, plots and checkpoints."""
    wandb: bool = False
    """Log to Weights & Biases (offline mode when no API key is set)."""
    wandb_project: str = "fastarcher"
    """W&B project name."""
    wandb_entity: str | None = None
    """W&B entity (team or user; default: the API key's)."""
    wandb_name: str | None = None
    """W&B run name (default: the run folder's name)."""
    wandb_group: str | None = None
    """W&B group, e.g. one per sweep or study."""
    wandb_tags: tuple[str, ...] = ()
    """W&B tags of the run."""
    progress: bool = True
    """Show a progress bar and per-iteration lines on the console."""


@dataclass(kw_only=True)
class CheckpointConfig:
    save_every: int = 0
    """Save a checkpoint every N iterations (0 = only at the end)."""
    keep_last: int = 2
    """Checkpoints kept in the run folder (older ones are deleted)."""
    resume: str = "none"
    """'auto' (latest valid checkpoint in run_dir, else fresh), 'none', or a checkpoint path."""
    verify: Literal["crc32", "size"] = "crc32"
    """How a resume checks checkpoint files against the manifest: sizes and CRC-32, or sizes only."""
    export_hf: bool = True
    """At the end of the run, save the policy as a Hugging Face folder (run_dir/hf_policy)."""
    save_on_sigterm: bool = True
    """On SIGTERM (preemption), save a checkpoint at the end of the current iteration, then stop."""

    def validate(self) -> None:
        _non_negative(self, "checkpoint", "save_every")
        _positive(self, "checkpoint", "keep_last")
        if self.resume not in ("auto", "none") and not Path(self.resume).exists():
            raise ValueError(f"checkpoint.resume ({self.resume!r}) must be 'auto', 'none' or an existing checkpoint, "
                             f"checkpoints or run folder")


@dataclass(kw_only=True)
class GuardConfig:
    skip_nonfinite: bool = True
    """Skip an optimizer step whose loss or gradient norm is NaN/Inf (costs one host sync per step)."""
    max_consecutive_skips: int = 10
    """Stop the run after this many skipped steps in a row of one optimizer (0 = never stop)."""
    max_param_abs: float = 1e6
    """Stop the run when a step leaves any parameter with |w| above this, or NaN/Inf (0 = NaN/Inf only)."""

    def validate(self) -> None:
        _non_negative(self, "guard", "max_consecutive_skips", "max_param_abs")


@dataclass(kw_only=True)
class TrainConfig:
    algo: Algo = "archer"
    """Algorithm (docs/algorithms.md): archer (off-policy hierarchical actor-critic), chai (ArCHer's critic
    picking among a frozen policy's samples), reinforce, grpo, rloo, reinforce_pp, remax, ppo, filtered_bc, or
    sft only."""
    config: str | None = None
    """YAML preset whose values become the defaults (flags still override them)."""
    iterations: int = 100
    """Training iterations (rollout + updates)."""
    seed: int = 0
    """One seed for envs, sampling, buffer sampling and model init."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Training device: CUDA when available ('auto'), else CPU."""
    model: ModelConfig = field(default_factory=ModelConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    archer: ArcherConfig = field(default_factory=ArcherConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    chai: ChaiConfig = field(default_factory=ChaiConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    kl: KLConfig = field(default_factory=KLConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    trace: TraceConfig = field(default_factory=TraceConfig)

    def validate(self, world_size: int = 1) -> None:
        """Cross-field rules; raises ValueError naming the field to change."""
        _check_finite(self, "")  # NaN passes every `<=` range check below, so this comes first
        if self.iterations <= 0:
            raise ValueError(f"iterations ({self.iterations}) must be positive")
        for part in (self.rollout, self.replay, self.archer, self.baseline, self.ppo, self.chai, self.optim, self.kl, self.warm_start,
                     self.eval, self.checkpoint, self.guard):
            part.validate()
        if self.rollout.num_envs % world_size:
            raise ValueError(
                f"rollout.num_envs ({self.rollout.num_envs}) must be divisible by the number of processes "
                f"({world_size})"
            )
        if (self.rollout.num_envs // world_size) % self.rollout.group_size:
            raise ValueError(f"rollout.num_envs ({self.rollout.num_envs}) / processes ({world_size}) must be a multiple "
                             f"of rollout.group_size ({self.rollout.group_size}): a group is played on one process")
        if self.algo in ("grpo", "rloo") and self.rollout.group_size < 2:
            raise ValueError(f"algo {self.algo!r} compares episodes of the same env seed: set rollout.group_size to 2 "
                             f"or more (e.g. --rollout.group-size 4)")
        if self.algo == "archer" and self.kl.coef > 0 and self.kl.placement != "loss":
            raise ValueError("algo 'archer' takes the KL in the actor loss only (its rewards come from the replay "
                             "buffer): use --kl.placement loss")
        if self.kl.coef > 0 and self.algo not in KL_ALGOS:
            raise ValueError(f"kl.coef ({self.kl.coef}) applies to the policy-gradient algorithms ({', '.join(KL_ALGOS)}), "
                             f"not to {self.algo!r}: drop --kl.coef")
        if self.algo == "chai" and self.archer.token_baseline:
            raise ValueError("algo 'chai' never trains the policy: drop --archer.token-baseline")
        if self.algo == "reinforce_pp" and self.kl.coef > 0 and self.kl.placement != "reward":
            raise ValueError("algo 'reinforce_pp' puts the KL in the reward (REINFORCE++): use --kl.placement reward")
        if self.eval.random_episodes % world_size:
            raise ValueError(f"eval.random_episodes ({self.eval.random_episodes}) must be divisible by the number of "
                             f"processes ({world_size})")
        if self.eval.episodes % world_size:
            raise ValueError(f"eval.episodes ({self.eval.episodes}) must be divisible by the number of processes ({world_size})")
        if self.archer.batch_size > self.replay.capacity:
            raise ValueError(
                f"archer.batch_size ({self.archer.batch_size}) must not exceed replay.capacity ({self.replay.capacity})"
            )
        if self.rollout.context_tokens > self.replay.max_state_len:
            raise ValueError(
                f"rollout.context_tokens ({self.rollout.context_tokens}) must not exceed replay.max_state_len "
                f"({self.replay.max_state_len}): raise replay.max_state_len or shorten the window"
            )
        if self.replay.max_action_len < self.rollout.max_new_tokens:
            raise ValueError(
                f"replay.max_action_len ({self.replay.max_action_len}) must be at least rollout.max_new_tokens "
                f"({self.rollout.max_new_tokens})"
            )
        if not self.rollout.constrain_actions and self.replay.max_action_len < self.rollout.max_new_tokens + 1:
            # Unconstrained, an utterance cut at max_new_tokens is closed with the stop token: one more token.
            raise ValueError(
                f"replay.max_action_len ({self.replay.max_action_len}) must be at least rollout.max_new_tokens + 1 "
                f"({self.rollout.max_new_tokens + 1}) when rollout.constrain_actions is off (a cut utterance is "
                f"closed with the stop token)"
            )
        if self.warm_start.to_replay and self.algo not in REPLAY_ALGOS:
            raise ValueError(f"warm_start.to_replay needs an algorithm with a replay buffer ({', '.join(REPLAY_ALGOS)}); "
                             f"algo {self.algo!r} learns on-policy only")
        if self.warm_start.to_replay and self.warm_start.steps == 0:
            raise ValueError("warm_start.to_replay writes the warm start's demonstrations: set warm_start.steps > 0")
        if self.algo == "sft" and self.warm_start.steps == 0:
            raise ValueError("algo 'sft' trains only the warm start: set warm_start.steps > 0")
        if self.algo == "ppo" and self.ppo.value_model == "policy" and world_size > 1:
            raise ValueError("ppo.value_model 'policy' is supported on one process only; use ppo.value_model "
                             "'separate' with torchrun")
        if self.model.lora.enabled and self.critic.encoder == "policy":
            raise ValueError("critic.encoder 'policy' reads the policy's trunk, which LoRA freezes and wraps: use "
                             "critic.encoder separate with model.lora")
        if self.device == "cuda" and not cuda_visible():
            raise ValueError("device is 'cuda' but no CUDA GPU is visible: pass --device cpu (or auto)")
        if self.rollout.engine == "sglang" and not cuda_visible():
            raise ValueError("rollout.engine sglang needs a CUDA GPU and none is visible: use --rollout.engine hf")
        _check_model_files(self.model.path, self.model.gguf_file)
        if self.critic.init == "policy" and (self.critic.encoder != "separate" or self.critic.encoder_path is not None
                                              or self.model.lora.enabled):
            raise ValueError("critic.init policy copies the policy's trunk into the separate encoder: use it with "
                             "critic.encoder separate, without critic.encoder_path and without model.lora")
        if self.critic.encoder_path is not None:
            if self.critic.encoder != "separate":
                raise ValueError("critic.encoder_path gives the separate encoder's weights: use critic.encoder separate")
            if not (Path(self.critic.encoder_path) / "config.json").is_file():
                raise ValueError(f"critic.encoder_path ({self.critic.encoder_path!r}) is not a local Hugging Face model "
                                 f"folder (no config.json)")

    def check_env_fits(self, sizes: TokenSizes) -> None:
        """Token limits against the chosen env's longest observation and action (`envs.token_sizes`);
        one error listing every flag to raise, since raising one limit can require another."""
        r, env = self.rollout, self.env.name
        raises = []
        if self.replay.max_obs_len < sizes.max_obs:
            raises.append(f"--replay.max-obs-len from {self.replay.max_obs_len} to {sizes.max_obs}")
        # A window shorter than one observation never shows the policy and critic a whole state.
        if 0 < r.context_tokens < sizes.max_obs:
            raises.append(f"--rollout.context-tokens from {r.context_tokens} to {sizes.max_obs}")
            if self.replay.max_state_len < sizes.max_obs:
                raises.append(f"--replay.max-state-len from {self.replay.max_state_len} to {sizes.max_obs}")
        if sizes.max_action is None and r.constrain_actions:
            raise ValueError(f"env.name {env!r} takes free-form replies, not a fixed set of actions: pass "
                             f"--rollout.no-constrain-actions")
        if sizes.max_action is not None:  # free-form replies are bounded by max_new_tokens alone
            # Constrained decoding emits the stop token too; unconstrained, a cut utterance is closed after it.
            action = sizes.max_action if r.constrain_actions else sizes.max_action - 1
            if r.max_new_tokens < action:
                raises.append(f"--rollout.max-new-tokens from {r.max_new_tokens} to {action}")
                least = action if r.constrain_actions else action + 1
                if self.replay.max_action_len < least:
                    raises.append(f"--replay.max-action-len from {self.replay.max_action_len} to {least}")
        if raises:
            actions = "free-form replies" if sizes.max_action is None else \
                f"actions of up to {sizes.max_action} (stop token included)"
            raise ValueError(f"env.name {env!r} has observations of up to {sizes.max_obs} tokens and {actions}; "
                             f"raise " + ", ".join(raises))


def _check_model_files(path: str | None, gguf_file: str | None) -> None:
    """A model folder must exist and hold a config (or the named GGUF file) before anything loads it;
    otherwise transformers takes the path for a Hub repository id and fails far from the cause."""
    if path is None:
        if gguf_file is not None:
            raise ValueError(f"model.gguf_file ({gguf_file!r}) needs model.path, the folder that holds it")
        return
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"model.path ({path!r}) is not a folder: pass a local Hugging Face model folder, or "
                         f"leave it unset for the built-in model")
    if gguf_file is not None:
        if not (folder / gguf_file).is_file():
            raise ValueError(f"model.gguf_file ({gguf_file!r}) is not a file in model.path ({path!r})")
    elif not (folder / "config.json").is_file():
        raise ValueError(f"model.path ({path!r}) holds no config.json: pass a Hugging Face model folder "
                         f"(or --model.gguf-file for a GGUF file in it)")


def _check_finite(cfg: Any, prefix: str) -> None:
    """Every float field, at any depth (tuples of floats included), must be finite."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            _check_finite(value, f"{prefix}{f.name}.")
            continue
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, float) and not math.isfinite(item):
                raise ValueError(f"{prefix}{f.name} ({value!r}) must be a finite number")


def _positive(cfg: Any, prefix: str, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value <= 0:
            raise ValueError(f"{prefix}.{name} ({value}) must be positive")


def _non_negative(cfg: Any, prefix: str, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value < 0:
            raise ValueError(f"{prefix}.{name} ({value}) must not be negative")


def _check_scalar_type(name: str, default: Any, value: Any, kind: type | None = None) -> None:
    """A YAML value must have the field's type, `kind` or else that of its default (an int is fine
    where a float is)."""
    kind = kind if kind is not None else type(default)
    if value is None:
        ok = default is None
    elif kind is bool:
        ok = isinstance(value, bool)
    elif kind in (int, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and kind is int and isinstance(value, float) and not value.is_integer():
            ok = False
    elif kind is str:
        ok = isinstance(value, str)
    else:
        return
    if not ok:
        like = "or null" if default is None else f"like its default ({default!r})"
        raise ValueError(f"config key '{name}' must be a {kind.__name__} {like}, got {value!r}")


def _check_value(name: str, hint: Any, default: Any, value: Any) -> None:
    """A YAML value must fit the field's annotation: one of a Literal's choices, null where the field is
    optional, else the scalar type (containers are left to the part's own validation)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if value not in args or isinstance(value, bool):
            raise ValueError(f"{name} ({value!r}) must be one of {', '.join(map(str, args))}")
        return
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return
        kinds = [a for a in args if a is not type(None)]
        if len(kinds) == 1:
            _check_value(name, kinds[0], default, value)
        return
    if isinstance(hint, type) and (hint in (bool, int, float, str) or value is None):
        _check_scalar_type(name, default, value, hint if hint in (bool, int, float, str) else None)


def _merge(instance: Any, values: dict, path: str) -> Any:
    """A copy of dataclass `instance` with `values` (nested dicts) applied; unknown keys are errors."""
    known = {f.name: f for f in dataclasses.fields(instance)}
    hints = typing.get_type_hints(type(instance))
    updates = {}
    for key, value in values.items():
        if key not in known:
            raise ValueError(f"unknown config key '{path}{key}' (known: {', '.join(sorted(known))})")
        current = getattr(instance, key)
        if dataclasses.is_dataclass(current):
            if value is None:  # an empty section (every key commented out)
                continue
            if not isinstance(value, dict):
                raise ValueError(f"config key '{path}{key}' is a section: it must hold '{path}{key}.*' keys, "
                                 f"got {value!r}")
            updates[key] = _merge(current, value, f"{path}{key}.")
        else:
            _check_value(f"{path}{key}", hints[key], current, value)
            if isinstance(value, list) and typing.get_origin(hints[key]) is tuple:
                value = tuple(value)  # YAML lists fill tuple fields (tyro then sees the declared type)
            updates[key] = value
    return dataclasses.replace(instance, **updates)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader (plain data, no objects) that refuses a key given twice in one mapping, which plain
    YAML resolves silently in favour of the last one."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable) and key in seen:
                mark = key_node.start_mark
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice", mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    """The YAML document in `path` (plain data only: no objects are built); one-line errors."""
    try:
        return yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"config preset {str(path)!r} cannot be read as text ({error})") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or type(error).__name__
        raise ValueError(f"config preset {str(path)!r} is not valid YAML{where}: {problem}") from None


SHIPPED_PRESETS = Path(__file__).resolve().parent.parent / "configs"
"""The presets shipped with fastarcher (the repository's configs/, installed beside the package)."""


def shipped_presets() -> list[str]:
    return sorted(p.stem for p in SHIPPED_PRESETS.glob("*.yaml"))


def resolve_preset(path: str | Path) -> Path:
    """`path` if it is a file; else a shipped preset: by name (`tiny_cpu`) or by its path in the repository
    (`configs/tiny_cpu.yaml`), from any working directory."""
    given = Path(path)
    if given.is_file():
        return given
    candidates = [SHIPPED_PRESETS / given.name] if given.suffix == ".yaml" and given.parent == Path("configs") else []
    if given.suffix == "" and given.parent == Path("."):
        candidates.append(SHIPPED_PRESETS / f"{given.name}.yaml")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    names = ", ".join(shipped_presets()) or "none found"
    raise ValueError(f"config preset {str(path)!r} does not exist: give a YAML file or a shipped preset by name ({names})")


PRESET_DATA_FIELDS = ("train_files", "val_files", "corpus_files")
"""`env.qa` file lists that a preset names relative to its own folder (flags stay relative to the working
directory)."""


def _data_paths_from(cfg: TrainConfig, folder: Path) -> TrainConfig:
    """`cfg` with the preset's relative data files joined to the preset's folder, so that a preset loads the
    same files from any working directory (shipped presets by name included)."""
    def join(name: str) -> str:
        return name if Path(name).is_absolute() else os.path.normpath(folder / name)

    qa = dataclasses.replace(cfg.env.qa, **{f: tuple(join(n) for n in getattr(cfg.env.qa, f)) for f in PRESET_DATA_FIELDS})
    return dataclasses.replace(cfg, env=dataclasses.replace(cfg.env, qa=qa))


def load_preset(path: str | Path) -> TrainConfig:
    """TrainConfig with the YAML preset's values applied over the built-in defaults (`resolve_preset`)."""
    path = resolve_preset(path)
    values = read_yaml(path)
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ValueError(f"config preset {str(path)!r} must hold a mapping of fields")
    cfg = _merge(TrainConfig(), values, "")
    cfg = _data_paths_from(cfg, path.parent)
    if cfg.env.max_turns is not None:
        # A preset is shared: its turn limit must not follow `--env.name` onto another env.
        where = "env.options.max_turns" if cfg.env.user_env else f"env.{cfg.env.name}.max_turns"
        raise ValueError(f"config key 'env.max_turns' ({cfg.env.max_turns}) in preset {str(path)!r} would apply to "
                         f"any env that --env.name picks: set {where} in the preset instead")
    return dataclasses.replace(cfg, config=str(path))


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)
