"""ArCHer losses: utterance-level double critic with target networks, token-level policy gradient.

Paper: Zhou et al. 2024, "ArCHer: Training Language Model Agents via Hierarchical Multi-Turn RL",
https://arxiv.org/abs/2402.19446. Reference code: github.com/YifeiZhou02/ArCHer,
archer/algorithms/archer/trainer.py (`critic_loss`, `actor_loss`). The math here is the same:

- Q_i(s, a) regresses to  y_Qi = r + γ (1 − done) · V̄_i(s′)   (head i with its own target V head, no min)
- V_i(s)    regresses to  y_Vi = Q̄_i(s, a′),  a′ ~ π(·|s) freshly sampled from the current policy
- critic loss = MSE(Q1, y_Q1) + MSE(Q2, y_Q2) + MSE(V1, y_V1) + MSE(V2, y_V2)
- advantage A = min(Q1, Q2)(s, a′) − min(V1, V2)(s), online critic, no gradient
- actor loss = −mean_b(A_b · Σ_h log π(a′_h | s, a′_<h)) − entropy_coeff · mean_b(entropy_b)

Every loss function is pure (tensors in, tensors out): no model calls, no `.item()`, no collectives;
`Archer` at the end is the algorithm the training loop runs (fastarcher/algos/base.py). Losses
are means over the rows of one microbatch; with gradient accumulation over k microbatches the trainer
divides each loss by k, so the step sees the mean over all k·B rows and the learning rate does not
depend on k. (The reference code sums the k microbatch gradients instead, i.e. its effective lr is
k times ours.) Metrics are detached 0-d tensors keyed `section/name`.
"""
from __future__ import annotations

import copy
import dataclasses
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from fastarcher.algos.base import AlgorithmBase
from fastarcher.algos.kl_control import KLControl
from fastarcher.algos.on_policy import PolicyTokens
from fastarcher.checkpoint import ModelState, OptimizerState
from fastarcher.critic import DoubleCritic, check_encoder_matches, make_target, policy_trunk_state, soft_update
from fastarcher.parallel import parallelize
from fastarcher.replay import ReplayBuffer
from fastarcher.value_model import TokenValueModel


def _std(x: Tensor) -> Tensor:
    """Population std (defined for a single row too)."""
    return x.std(correction=0) if x.numel() > 0 else x.new_zeros(())


@torch.no_grad()
def critic_targets(
    *,
    reward: Tensor,
    done: Tensor,
    target_v1_next: Tensor,
    target_v2_next: Tensor,
    target_q1_fresh: Tensor,
    target_q2_fresh: Tensor,
    gamma: float,
    mc_return: Tensor | None = None,
    mc_mix: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Regression targets (y_Q1, y_Q2, y_V1, y_V2), each (B,), detached.

    reward, done: (B,) from the buffer (done = 1.0 at the last turn).
    target_vi_next: V̄_i(s′) from the target critic on the next state.
    target_qi_fresh: Q̄_i(s, a′) from the target critic with a′ ~ π(·|s) sampled now.
    mc_return, mc_mix: y_Qi = (1 − λ)·(r + γ V̄_i(s′)) + λ·G with G the replayed episode's discounted return
    from this turn (λ = 0, the reference: pure one-step TD).
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma ({gamma}) must be in [0, 1]")
    if not 0.0 <= mc_mix <= 1.0:
        raise ValueError(f"mc_mix ({mc_mix}) must be in [0, 1]")
    not_done = 1.0 - done.to(reward.dtype)  # (B,) zero after the last turn: no bootstrap
    y_q1 = reward + gamma * not_done * target_v1_next
    y_q2 = reward + gamma * not_done * target_v2_next
    if mc_mix > 0.0:
        if mc_return is None:
            raise ValueError("mc_mix > 0 needs the Monte-Carlo returns")
        y_q1 = (1.0 - mc_mix) * y_q1 + mc_mix * mc_return
        y_q2 = (1.0 - mc_mix) * y_q2 + mc_mix * mc_return
    return y_q1.detach(), y_q2.detach(), target_q1_fresh.detach(), target_q2_fresh.detach()


def critic_loss(
    *,
    q1: Tensor, q2: Tensor, v1: Tensor, v2: Tensor,
    y_q1: Tensor, y_q2: Tensor, y_v1: Tensor, y_v2: Tensor,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Sum of four MSEs (each a mean over the B rows); targets are detached here as well.

    Metrics: critic/loss = critic/q_loss + critic/v_loss, where q_loss = MSE(Q1)+MSE(Q2) and
    v_loss = MSE(V1)+MSE(V2); head means and target means.
    """
    y_q1, y_q2, y_v1, y_v2 = (y.detach() for y in (y_q1, y_q2, y_v1, y_v2))
    q1_loss = F.mse_loss(q1, y_q1)
    q2_loss = F.mse_loss(q2, y_q2)
    v1_loss = F.mse_loss(v1, y_v1)
    v2_loss = F.mse_loss(v2, y_v2)
    q_loss = q1_loss + q2_loss
    v_loss = v1_loss + v2_loss
    loss = q_loss + v_loss
    q1d, q2d, v1d, v2d = q1.detach(), q2.detach(), v1.detach(), v2.detach()
    metrics = {
        "critic/loss": loss.detach(),
        "critic/q_loss": q_loss.detach(),
        "critic/v_loss": v_loss.detach(),
        "critic/q1_loss": q1_loss.detach(),
        "critic/q2_loss": q2_loss.detach(),
        "critic/v1_loss": v1_loss.detach(),
        "critic/v2_loss": v2_loss.detach(),
        "critic/q_mean": torch.minimum(q1d, q2d).mean(),
        "critic/v_mean": torch.minimum(v1d, v2d).mean(),
        "critic/q1_mean": q1d.mean(),
        "critic/q2_mean": q2d.mean(),
        "critic/v1_mean": v1d.mean(),
        "critic/v2_mean": v2d.mean(),
        "critic/q1_std": _std(q1d),
        "critic/v1_std": _std(v1d),
        "critic/target_q_mean": 0.5 * (y_q1.mean() + y_q2.mean()),
        "critic/target_v_mean": 0.5 * (y_v1.mean() + y_v2.mean()),
    }
    return loss, metrics


@torch.no_grad()
def archer_advantage(*, q1: Tensor, q2: Tensor, v1: Tensor, v2: Tensor) -> Tensor:
    """A = min(Q1, Q2)(s, a′) − min(V1, V2)(s), (B,), detached (the actor never trains the critic)."""
    return (torch.minimum(q1, q2) - torch.minimum(v1, v2)).detach()


def actor_loss(
    *,
    logprob_sum: Tensor,
    advantage: Tensor,
    entropy: Tensor | None = None,
    entropy_coeff: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Utterance-level policy gradient: −mean_b(A_b · Σ_h log π(a_h|s, a_<h)) − entropy_coeff · mean_b(H_b).

    logprob_sum: (B,) Σ over the utterance's tokens of log π (differentiable).
    advantage: (B,) treated as a constant (detached here).
    entropy: (B,) per-utterance policy entropy (e.g. mean token entropy), needed when entropy_coeff ≠ 0.
    Minimising −A·log π raises the probability of utterances with positive advantage.
    """
    if entropy_coeff != 0.0 and entropy is None:
        raise ValueError(f"actor entropy_coeff ({entropy_coeff}) is non-zero but no entropy was given")
    advantage = advantage.detach().to(logprob_sum.dtype)
    pg_loss = -(advantage * logprob_sum).mean()
    loss = pg_loss
    metrics = {
        "actor/pg_loss": pg_loss.detach(),
        "actor/advantage_mean": advantage.mean(),
        "actor/advantage_std": _std(advantage),
        "actor/advantage_min": advantage.min(),
        "actor/advantage_max": advantage.max(),
        "actor/logprob_mean": logprob_sum.detach().mean(),
    }
    if entropy is not None:
        entropy_mean = entropy.mean()
        if entropy_coeff != 0.0:
            loss = loss - entropy_coeff * entropy_mean
        metrics["actor/entropy"] = entropy_mean.detach()
    metrics["actor/loss"] = loss.detach()
    return loss, metrics


def token_baseline_actor_loss(
    *,
    token_logprobs: Tensor,
    token_values: Tensor,
    advantage: Tensor,
    mask: Tensor,
) -> tuple[Tensor, dict[str, Tensor]]:
    """"ArCHer with token-level baseline": per-token values b_h regress to the utterance advantage A,
    and the policy gradient uses the residual A − b_h at every token.

    token_logprobs, token_values, mask: (B, T); advantage: (B,).
    loss = −mean_b Σ_h mask·(A − b_h)·log π_h  +  Σ mask·(A − b_h)² / Σ mask
    The residual is detached in the policy term; the value term trains only b. The reference code
    averages the value loss over all B·T positions (pads included as zeros); we average over real
    tokens, which only rescales that term.
    """
    mask = mask.to(token_logprobs.dtype)
    advantage = advantage.detach().to(token_logprobs.dtype)[:, None]  # (B, 1)
    residual = advantage - token_values  # (B, T)
    value_loss = (residual.pow(2) * mask).sum() / mask.sum().clamp(min=1.0)  # mean over real tokens
    pg_loss = -(residual.detach() * token_logprobs * mask).sum(dim=1).mean()
    loss = pg_loss + value_loss
    num_tokens = mask.sum().clamp(min=1.0)
    metrics = {
        "actor/pg_loss": pg_loss.detach(),
        "actor/value_loss": value_loss.detach(),
        "actor/advantage_mean": advantage.mean(),
        "actor/advantage_std": _std(advantage),
        "actor/token_value_mean": (token_values.detach() * mask).sum() / num_tokens,
        "actor/residual_advantage_mean": (residual.detach() * mask).sum() / num_tokens,
        "actor/loss": loss.detach(),
    }
    return loss, metrics


# --------------------------------------------------------------------------------------------------
# The algorithm the training loop runs (fastarcher/algos/base.py): builds the critics and the replay
# buffer, and runs the losses above in the paper's order.


def _mask(lengths: Tensor, width: int) -> Tensor:
    return torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]  # (B, T)


def _trim(ids: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    return ids[:, : max(int(lengths.max()), 1)], lengths


class Archer(AlgorithmBase):
    """`--algo archer`. Every iteration: add the turns to the replay buffer; `critic_epochs` critic steps
    on replayed transitions (a fresh a′ ~ π for the V targets), each followed by a Polyak update of the
    target; after `warmup_iterations`, `actor_epochs` actor steps with A = min Q(s, a′) − min V(s). The
    fresh actions of a phase are drawn in large batched engine calls at its start (the policy does not
    change during the critic epochs; the actor phase draws again after every actor step).

    Owns (and checkpoints) the double critic, its target, the critic optimizer and the replay buffer.
    With `critic.encoder policy` the critic embeds with the policy's backbone (FSDP2-sharded with it); with
    `critic.backbone_grad` as well, the critic optimizer also owns the backbone's parameters, so the
    critic's gradients there are stepped and cleared by it and the actor steps its own loss only.
    """

    name = "archer"
    samples_in_update = True  # fresh actions a′ in both phases; each phase releases engine memory itself
    acts_with_critic = False

    def __init__(self, ctx):
        self.ctx, cfg = ctx, ctx.cfg
        actor, device = ctx.actor, ctx.actor.device
        backbone = actor.policy if cfg.critic.encoder == "policy" else None  # its trunk, through the root (FSDP2)
        critic = DoubleCritic(cfg.critic, vocab_size=ctx.vocab_size, pad_id=actor.pad_id, backbone=backbone)
        if cfg.critic.init == "policy":  # refused before any work when the shapes differ; copied in start()
            check_encoder_matches(critic.encoder, policy_trunk_state(actor.policy))
        # an unsharded copy that acts during rollouts (CHAI): a sharded forward is a collective, and ranks play
        # different numbers of turns
        self.local_critic = copy.deepcopy(critic).to(device) if self.acts_with_critic and ctx.mesh is not None else None
        self.critic, self.target = critic.to(device), make_target(critic).to(device)
        if ctx.mesh is not None:
            parallelize(self.critic, self.critic.encoder_layers(), ctx.mesh)
            parallelize(self.target, self.target.encoder_layers(), ctx.mesh)
        self.critic.train()
        self.critic_modules = self.critic
        if backbone is not None and cfg.critic.backbone_grad:
            self.critic_modules = torch.nn.ModuleDict({"critic": self.critic, "backbone": backbone})
        self.critic_opt = torch.optim.AdamW(self.critic_modules.parameters(), lr=cfg.optim.critic_lr,
                                            weight_decay=cfg.optim.weight_decay)
        # s′ is rebuilt as the last `state_window` tokens of s ⊕ a ⊕ o, the same window the rollout keeps
        self.state_window = cfg.rollout.context_tokens or cfg.replay.max_state_len
        r = cfg.replay
        self.buffer = ReplayBuffer(r.capacity, r.max_state_len, r.max_action_len, r.max_obs_len, pad_id=actor.pad_id,
                                   device=device)
        self._parts = {"critic": ModelState(self.critic), "target": ModelState(self.target),
                       "critic_opt": OptimizerState(self.critic_modules, self.critic_opt, "critic_opt", ctx.log),
                       "replay": self.buffer}
        self.kl = KLControl(ctx)  # a reference policy only with --kl.coef > 0 (the KL goes in the actor loss)
        self._parts.update(self.kl.parts())
        self.baseline = self.baseline_opt = None
        if cfg.archer.token_baseline:  # b_h(s, a_<h): a token value model started from the policy
            baseline = TokenValueModel(ctx.make_policy())
            self.baseline = ctx.shard(baseline, baseline.blocks())
            self.baseline.train()
            self.baseline_opt = torch.optim.AdamW([p for p in self.baseline.parameters() if p.requires_grad],
                                                  lr=cfg.optim.critic_lr, weight_decay=cfg.optim.weight_decay)
            self._parts.update({"token_baseline": ModelState(self.baseline), "token_baseline_opt": OptimizerState(
                self.baseline, self.baseline_opt, "token_baseline_opt", ctx.log)})

    def parts(self) -> dict:
        return dict(self._parts)

    def describe(self) -> str:
        params = sum(p.numel() for p in self.critic.parameters())
        return f"critic: {params:,} params ({self.ctx.cfg.critic.encoder} encoder); {self.buffer.describe()}"

    def start(self, resumed: bool) -> None:
        self.kl.start(resumed)
        if self.ctx.cfg.critic.init == "policy" and not resumed:  # after the warm start: its features
            trunk = policy_trunk_state(self.ctx.actor.policy)
            self.critic.encoder.load_state_dict(trunk)
            self.target.encoder.load_state_dict(trunk)
        if self.baseline is not None and not resumed:
            self.baseline.copy_trunk_from(self.ctx.actor.policy)

    def add_demonstrations(self, transitions) -> None:
        """Demonstration turns (`warm_start.to_replay`) into the replay buffer, once, before the first
        iteration: the critic learns from them like any played turn; the buffer's checkpoint keeps them."""
        self.buffer.add(transitions.to(self.ctx.actor.device))

    def update(self, batch, bag) -> dict[str, float]:
        a, cfg = self.ctx.cfg.archer, self.ctx.cfg
        for opt in (self.critic_opt, self.baseline_opt) if cfg.optim.scheduled else ():
            for group in opt.param_groups if opt is not None else ():
                group["lr"] = cfg.optim.critic_lr * cfg.optim.lr_multiplier(batch.iteration, cfg.iterations)
        if len(batch.transitions):
            self.buffer.add(batch.transitions.to(self.ctx.actor.device))
        t0 = time.perf_counter()
        self.critic_phase(bag, batch.iteration)
        out = {"time/critic_s": time.perf_counter() - t0, "replay/size": float(len(self.buffer))}
        if batch.iteration >= a.warmup_iterations and a.actor_epochs > 0:
            t1 = time.perf_counter()
            sync_s = self.actor_phase(bag, batch.iteration)
            out.update({"time/actor_s": time.perf_counter() - t1 - sync_s, "time/sync_s": sync_s})
        if self.kl.enabled:  # logged every iteration (0 while no actor step measured it)
            out.update(self.kl.end_iteration(self.ctx.cfg.rollout.num_envs))
        return out

    def critic_phase(self, bag, iteration: int) -> None:
        a, ctx = self.ctx.cfg.archer, self.ctx
        micro = a.critic_epochs * a.grad_accum
        batch = self.buffer.sample(a.batch_size * micro, ctx.streams.buffer_gen)
        fresh_ids, fresh_len, _, calls = ctx.actor.sample_actions(batch, ctx.streams.sample_gen,
                                                                  self.acting_engine(ctx.actor.engine))
        ctx.actor.engine.release_cache()  # the critic trains now; the actor phase samples from the same weights
        bag.add({"count/fresh_generate_calls": float(calls)})
        # s' of every row of the phase in one rebuild (per micro-step the small calls cost more than the work)
        next_all_ids, next_all_len = batch.next_state(self.state_window)
        for step in range(a.critic_epochs):
            for k in range(a.grad_accum):
                rows = slice((step * a.grad_accum + k) * a.batch_size, (step * a.grad_accum + k + 1) * a.batch_size)
                mb = batch.select(rows).trimmed()
                f_ids, f_len = _trim(fresh_ids[rows], fresh_len[rows])
                s_mask = _mask(mb.state_len, mb.state_ids.shape[1])
                a_mask = _mask(mb.action_len, mb.action_ids.shape[1])
                q1, q2, v1, v2 = self.critic(mb.state_ids, s_mask, mb.action_ids, a_mask)
                with torch.no_grad():
                    # cut to the width mb.next_state would give: the same target inputs, bit for bit
                    next_ids = next_all_ids[rows, :mb.next_state_width(self.state_window)]
                    next_len = next_all_len[rows]
                    # one target call: Q̄(s, a′) and V̄(s′), without embedding the replayed a for nothing
                    tq1, tq2, tv1, tv2 = self.target(mb.state_ids, s_mask, f_ids, _mask(f_len, f_ids.shape[1]),
                                                     next_ids, _mask(next_len, next_ids.shape[1]))
                    y_q1, y_q2, y_v1, y_v2 = critic_targets(
                        reward=mb.reward, done=mb.done, target_v1_next=tv1, target_v2_next=tv2,
                        target_q1_fresh=tq1, target_q2_fresh=tq2, gamma=a.gamma, mc_return=mb.mc_return,
                        mc_mix=a.mc_mix)
                loss, metrics = critic_loss(q1=q1, q2=q2, v1=v1, v2=v2, y_q1=y_q1, y_q2=y_q2, y_v1=y_v1, y_v2=y_v2)
                (loss / a.grad_accum).backward()
                ctx.guard.track("critic", loss / a.grad_accum)
                bag.add(metrics)
            bag.add({"critic/grad_norm": ctx.guard.check_and_step(
                "critic", self.critic_opt, max_norm=ctx.cfg.optim.critic_grad_clip, iteration=iteration)})
            soft_update(self.target, self.critic, a.tau)

    def actor_phase(self, bag, iteration: int) -> float:
        """ArCHer actor steps; returns the seconds spent syncing the engine after each step."""
        a, ctx = self.ctx.cfg.archer, self.ctx
        actor, traces = ctx.actor, ctx.actor.traces
        sync_s = 0.0
        for epoch in range(a.actor_epochs):
            step = (iteration - a.warmup_iterations) * a.actor_epochs + epoch  # actor step index of the traces
            batch = self.buffer.sample(a.batch_size * a.grad_accum, ctx.streams.buffer_gen)
            fresh_ids, fresh_len, fresh_sampled, calls = actor.sample_actions(batch, ctx.streams.sample_gen)
            actor.engine.sleep()  # the policy trains now and is synced back at the end of the epoch
            bag.add({"count/fresh_generate_calls": float(calls)})
            for k in range(a.grad_accum):
                rows = slice(k * a.batch_size, (k + 1) * a.batch_size)
                mb = batch.select(rows).trimmed()
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
                with traces.actor_micro_batch(step, mb.state_ids, mb.state_len, f_ids, f_sampled, advantage=advantage,
                                              q_value=torch.minimum(q1, q2)) as trace:  # forward + backward inside
                    if self.baseline is not None:
                        loss, metrics = self._token_baseline_loss(mb, f_ids, f_len, f_sampled, advantage, trace)
                    elif self.kl.in_loss:
                        loss, metrics = self._kl_actor_loss(mb, f_ids, f_len, f_sampled, advantage, trace)
                    else:
                        logprob_sum, entropy = actor.logprobs(mb.state_ids, mb.state_len, f_ids, f_len, trace=trace,
                                                              sampled_len=f_sampled)
                        loss, metrics = actor_loss(logprob_sum=logprob_sum, advantage=advantage, entropy=entropy,
                                                   entropy_coeff=a.entropy_coeff)
                    (loss / a.grad_accum).backward()
                ctx.guard.track("actor", loss / a.grad_accum)
                bag.add(metrics)
            bag.add(traces.finish_step(step))  # {} unless a trace is due at this step
            bag.add({"actor/grad_norm": ctx.guard.check_and_step(
                "actor", actor.optimizer, max_norm=ctx.cfg.optim.actor_grad_clip, iteration=iteration)})
            if self.baseline_opt is not None:
                bag.add({"actor/token_baseline_grad_norm": ctx.guard.check_and_step(
                    "token_baseline", self.baseline_opt, max_norm=ctx.cfg.optim.critic_grad_clip, iteration=iteration)})
            sync_s += actor.sync_engine()  # the next epoch samples a′ from the updated policy
        return sync_s

    def _kl_actor_loss(self, mb, f_ids, f_len, f_sampled, advantage, trace):
        """`actor_loss` on the fresh actions plus β · token-mean KL(π‖π_ref) on them (`--kl.coef`)."""
        actor, a = self.ctx.actor, self.ctx.cfg.archer
        out = actor.token_logprobs(mb.state_ids, mb.state_len, f_ids, f_len, sampled_len=f_sampled,
                                   log_distribution=self.kl.needs_distribution)
        logprob, token_entropy, mask = out[:3]
        if trace is not None:
            trace.set_token_entropy(token_entropy)
        loss, metrics = actor_loss(logprob_sum=(logprob * mask).sum(-1), advantage=advantage,
                                   entropy=(token_entropy * mask).sum(-1), entropy_coeff=a.entropy_coeff)
        tokens = PolicyTokens(logprob=logprob, mask=mask, entropy=token_entropy * mask, weights=advantage)
        fresh = dataclasses.replace(mb, action_ids=f_ids, action_len=f_len)
        kl_loss, kl_metrics = self.kl.loss_term(fresh, tokens, out[3] if self.kl.needs_distribution else None)
        loss = loss + kl_loss
        return loss, {**metrics, **kl_metrics, "actor/loss": loss.detach()}

    def _token_baseline_loss(self, mb, f_ids, f_len, f_sampled, advantage, trace):
        """`token_baseline_actor_loss` on the fresh actions, less the entropy bonus: the policy's per-token
        log-probs, the token baseline's b_h on the same (s, a′)."""
        actor, a = self.ctx.actor, self.ctx.cfg.archer
        logprob, token_entropy, mask = actor.token_logprobs(mb.state_ids, mb.state_len, f_ids, f_len,
                                                            sampled_len=f_sampled)
        if trace is not None:
            trace.set_token_entropy(token_entropy)
        values = self.baseline(mb.state_ids, mb.state_len, f_ids, f_len, pad_id=actor.pad_id)
        loss, metrics = token_baseline_actor_loss(token_logprobs=logprob, token_values=values.to(logprob.dtype),
                                                  advantage=advantage, mask=mask)
        entropy = (token_entropy * mask).sum(-1)
        loss = loss - a.entropy_coeff * entropy.mean()
        return loss, {**metrics, "actor/entropy": entropy.mean().detach(), "actor/loss": loss.detach()}
