"""The actor step uses its own loss on what was sampled (fastarcher/trainer.py actor phase, fastarcher/policy.py).

References: the same actor step replayed from identical weights, optimizer state and random streams with
no stale gradient on the policy; per-token log π of the closed utterance summed over its sampled tokens.
"""
import copy
import os

import pytest
import torch

from dist_helpers import tiny_policy
from fastarcher.policy import action_logprobs
from fastarcher.rollout.collect import close_utterance, pad_rows

FLAGS = ("--config configs/tiny_cpu.yaml --rollout.num-envs 4 --eval.episodes 4 --eval.no-random-baseline "
         "--archer.batch-size 6 --archer.warmup-iterations 0 --archer.critic-epochs 1 --archer.actor-epochs 1 "
         "--replay.capacity 64 --model.num-layers 1 --critic.num-layers 1 --log.no-progress "
         "--checkpoint.no-export-hf --checkpoint.no-save-on-sigterm --iterations 1").split()


def make_trainer(tmp_path, *flags):
    from fastarcher.dist import DistInfo
    from fastarcher.train import parse_config
    from fastarcher.trainer import Trainer

    cfg = parse_config(FLAGS + ["--log.run-dir", str(tmp_path / "run"), *flags])
    cfg.validate(world_size=1)
    trainer = Trainer(cfg, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    rollout = trainer.play(trainer.runner, trainer.train_seeds(), greedy=False)
    if trainer.algorithm.name == "archer":
        trainer.algorithm.buffer.add(rollout.transitions(cfg.archer.gamma, trainer.pad_id))
    return trainer


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_first_actor_step_with_a_shared_backbone_applies_the_actor_loss_alone(tmp_path):
    from fastarcher.metrics import MetricBag

    trainer = make_trainer(tmp_path, "--critic.encoder", "policy", "--critic.backbone-grad")
    backbone_before = [p.detach().clone() for p in trainer.policy.model.parameters()]
    archer = trainer.algorithm
    archer.critic_phase(MetricBag(), trainer.iteration)
    # the critic optimizer owns the shared backbone: it stepped it with the critic's gradients, then zeroed them
    assert any(not torch.equal(p, b) for p, b in zip(trainer.policy.model.parameters(), backbone_before))
    assert all(p.grad is None for p in trainer.policy.parameters())
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    opt_state = copy.deepcopy(trainer.actor_opt.state_dict())
    streams = trainer.streams.sample_gen.get_state(), trainer.streams.buffer_gen.get_state()

    archer.actor_phase(MetricBag(), trainer.iteration)
    update = [p.detach() - b for p, b in zip(trainer.policy.parameters(), before)]

    # reference: the same step from the same weights, optimizer state and streams, with no stale gradient
    with torch.no_grad():
        for p, b in zip(trainer.policy.parameters(), before):
            p.copy_(b)
    trainer.actor_opt.load_state_dict(opt_state)
    trainer.streams.sample_gen.set_state(streams[0])
    trainer.streams.buffer_gen.set_state(streams[1])
    trainer.policy.zero_grad(set_to_none=True)
    trainer.sync_engine()
    archer.actor_phase(MetricBag(), trainer.iteration)
    reference = [p.detach() - b for p, b in zip(trainer.policy.parameters(), before)]

    assert max(float(r.abs().max()) for r in reference) > 0
    assert all(torch.equal(u, r) for u, r in zip(update, reference))
    trainer.logger.close()


def test_cut_utterance_scores_only_its_sampled_tokens():
    # hand-made: row 0 was cut after 3 sampled tokens and closed with a stop token nobody sampled;
    # row 1 sampled its stop token itself. The sum must leave out row 0's appended stop only.
    policy, tokenizer = tiny_policy(init_std=0.3)
    stop = tokenizer.eos_token_id
    states, _ = pad_rows([[5, 6, 7, 8], [9, 10]], tokenizer.pad_token_id)
    sampled = [[11, 12, 13], [14, stop]]
    actions, action_len = pad_rows([close_utterance(t, stop) for t in sampled], tokenizer.pad_token_id)
    sampled_len = torch.tensor([3, 2])
    state_len = torch.tensor([4, 2])
    per_token, _, _ = action_logprobs(policy, states, state_len, actions, action_len,
                                      pad_id=tokenizer.pad_token_id, per_token=True)
    logprob_sum, entropy, mask = action_logprobs(policy, states, state_len, actions, action_len,
                                                 pad_id=tokenizer.pad_token_id, sampled_len=sampled_len)
    expected = torch.stack([per_token[0, :3].sum(), per_token[1, :2].sum()])
    assert torch.allclose(logprob_sum, expected, rtol=0, atol=1e-12)
    assert per_token[0, 3] < -1  # the appended stop token carries real log-probability that is left out
    assert mask.tolist() == [[True, True, True, False], [True, True, False, False]]  # entropy counts the same


def test_actor_loss_gets_the_log_prob_of_the_sampled_tokens_only(tmp_path, monkeypatch):
    import fastarcher.algos.archer as archer_module
    from fastarcher.metrics import MetricBag

    # no action constraint and 2 new tokens: most utterances are cut and closed with a stop token
    trainer = make_trainer(tmp_path, "--rollout.no-constrain-actions", "--rollout.max-new-tokens", "2")
    seen = {}
    real_generate, real_actor_loss = trainer.engine.generate, archer_module.actor_loss

    def record_generate(prompts, params, generator=None):
        out = real_generate(prompts, params, generator)
        seen.update(prompts=prompts, sampled=[list(t) for t in out.token_ids])
        return out

    def record_actor_loss(*, logprob_sum, **kwargs):  # called before the step: the policy is unchanged
        closed, lengths = pad_rows([close_utterance(t, trainer.stop_id) for t in seen["sampled"]], trainer.pad_id)
        states, state_len = pad_rows(seen["prompts"], trainer.pad_id)
        with torch.no_grad():
            per_token, _, _ = action_logprobs(trainer.policy, states, state_len, closed, lengths,
                                              pad_id=trainer.pad_id, per_token=True)
        seen["expected"] = torch.stack([per_token[i, :len(t)].sum() for i, t in enumerate(seen["sampled"])])
        seen["got"] = logprob_sum.detach()
        return real_actor_loss(logprob_sum=logprob_sum, **kwargs)

    monkeypatch.setattr(trainer.engine, "generate", record_generate)
    monkeypatch.setattr(archer_module, "actor_loss", record_actor_loss)
    trainer.algorithm.actor_phase(MetricBag(), trainer.iteration)
    assert any(t[-1] != trainer.stop_id for t in seen["sampled"])  # at least one cut utterance
    assert torch.allclose(seen["got"], seen["expected"], rtol=0, atol=1e-5), (seen["got"], seen["expected"])
    trainer.logger.close()


def test_reinforce_scores_the_sampled_tokens_of_cut_rollout_utterances_only(tmp_path, monkeypatch):
    import fastarcher.algos.reinforce as reinforce_module
    from fastarcher.algos.base import IterationBatch
    from fastarcher.metrics import MetricBag
    from fastarcher.replay import TransitionBatch

    # Rollout utterances cut at 2 new tokens are stored closed (3 tokens); the on-policy update must
    # score their 2 sampled tokens, and an utterance that sampled its own stop token whole.
    trainer = make_trainer(tmp_path, "--algo", "reinforce", "--rollout.no-constrain-actions",
                           "--rollout.max-new-tokens", "2")
    rollout = trainer.play(trainer.runner, trainer.train_seeds(), greedy=False)
    transitions = rollout.transitions(trainer.cfg.archer.gamma, trainer.pad_id)
    assert int(transitions.action_len.max()) == 3  # at least one cut utterance, closed with a stop token
    seen = {}
    real_select, real_loss = TransitionBatch.select, reinforce_module.policy_gradient_loss

    def record_select(batch, rows):
        seen["mb"] = real_select(batch, rows)
        return seen["mb"]

    def record_loss(*, logprob_sum, **kwargs):  # called before the step: the policy is unchanged
        mb = seen["mb"]
        with torch.no_grad():
            per_token, _, _ = action_logprobs(trainer.policy, mb.state_ids, mb.state_len, mb.action_ids,
                                              mb.action_len, pad_id=trainer.pad_id, per_token=True)
        sampled = mb.action_len.clamp(max=2)
        seen.setdefault("expected", []).append(torch.stack([per_token[i, :n].sum() for i, n in enumerate(sampled)]))
        seen.setdefault("closed", []).append(torch.stack([per_token[i, :n].sum() for i, n in enumerate(mb.action_len)]))
        seen.setdefault("got", []).append(logprob_sum.detach())
        return real_loss(logprob_sum=logprob_sum, **kwargs)

    monkeypatch.setattr(TransitionBatch, "select", record_select)
    monkeypatch.setattr(reinforce_module, "policy_gradient_loss", record_loss)
    trainer.algorithm.update(IterationBatch(0, rollout, transitions), MetricBag())
    got, expected, closed = (torch.cat(seen[k]) for k in ("got", "expected", "closed"))
    assert torch.allclose(got, expected, rtol=0, atol=1e-5), (got, expected)
    assert not torch.allclose(got, closed, rtol=0, atol=1e-3)  # the appended stop tokens would have counted
    trainer.logger.close()


def test_model_fused_head_flag_reaches_the_actor(tmp_path):
    assert make_trainer(tmp_path / "a").actor.fused_head is True
    assert make_trainer(tmp_path / "b", "--model.no-fused-head").actor.fused_head is False


def test_group_rollouts_share_prompts_and_states(tmp_path):
    """GRPO groups start G episodes from one prompt: the engine prefills it once and the scoring forward
    runs each distinct state once; ArCHer (group size 1) asks for neither."""
    grouped = make_trainer(tmp_path / "g", "--algo", "grpo", "--rollout.group-size", "2")
    assert grouped.actor.share_states and grouped.actor.sampling_params().share_prompts
    grouped.logger.close()
    single = make_trainer(tmp_path / "a")
    assert not single.actor.share_states and not single.actor.sampling_params().share_prompts
    single.logger.close()
    whole = make_trainer(tmp_path / "w", "--algo", "grpo", "--rollout.group-size", "2", "--rollout.no-share-prompts")
    assert not whole.actor.share_states and not whole.actor.sampling_params().share_prompts
    whole.logger.close()
