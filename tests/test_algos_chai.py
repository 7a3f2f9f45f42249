"""CHAI (fastarcher/algos/chai.py): the reranking engine plays the best of k samples by the critic's score
(ties: the first), always sampling; the Q used is min(Q1, Q2) of the critic on the closed utterance; the
policy is never stepped."""
import torch

from fastarcher.algos.chai import RerankingEngine
from fastarcher.rollout.base import GenerationOutput, SamplingParams


class _Engine:
    max_batch = 8

    def __init__(self):
        self.calls = []

    def generate(self, prompts, params, generator=None):
        self.calls.append((prompts, params))
        # utterance j of a prompt: [100 + j] (no stop token: the reranker closes it before scoring)
        return GenerationOutput(token_ids=[[100 + j % 3] for j in range(len(prompts))],
                                logprobs=[[-float(j)] for j in range(len(prompts))], num_calls=2)


def test_reranking_engine_plays_the_best_of_k_by_score():
    engine = _Engine()
    seen = {}

    def score(states, actions):
        seen["states"], seen["actions"] = states, actions
        # prompt 0 prefers utterance 101, prompt 1 ties 100 and 102 (the first wins)
        table = {(1, 100): 0.0, (1, 101): 2.0, (1, 102): 1.0, (2, 100): 5.0, (2, 101): 1.0, (2, 102): 5.0}
        return torch.tensor([table[(s[0], a[0])] for s, a in zip(states, actions)])

    out = RerankingEngine(engine, score, samples=3, stop_id=9).generate([[1], [2]], SamplingParams(greedy=True))
    assert out.token_ids == [[101], [100]] and out.logprobs == [[-1.0], [-3.0]] and out.num_calls == 2
    prompts, params = engine.calls[0]
    assert prompts == [[1], [1], [1], [2], [2], [2]] and params.greedy is False  # evaluation samples too
    assert seen["actions"][0] == [100, 9]  # scored as the replay stores it: closed with the stop token


def test_chai_scores_with_min_q_and_never_steps_the_policy(tmp_path, monkeypatch):
    from dist_helpers import REPO
    from fastarcher.algos.archer import _mask
    from fastarcher.dist import DistInfo
    from fastarcher.train import parse_config
    from fastarcher.trainer import Trainer

    monkeypatch.chdir(REPO)
    flags = ("--config configs/tiny_cpu.yaml --algo chai --chai.samples 3 --rollout.num-envs 4 --eval.episodes 2 "
             "--log.no-progress --model.num-layers 1 --critic.num-layers 1 --archer.batch-size 4").split()
    cfg = parse_config([*flags, "--log.run-dir", str(tmp_path / "run")])
    trainer = Trainer(cfg, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    algo = trainer.algorithm
    states, actions = [[5, 6, 7], [8, 9]], [[10, 11], [12]]
    q = algo.q_values(states, actions)
    s = torch.tensor([[5, 6, 7], [8, 9, trainer.pad_id]])
    a = torch.tensor([[10, 11], [12, trainer.pad_id]])
    q1, q2, _, _ = algo.critic(s, _mask(torch.tensor([3, 2]), 3), a, _mask(torch.tensor([2, 1]), 2))
    torch.testing.assert_close(q, torch.minimum(q1, q2).detach())
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    metrics = trainer.iterate()
    assert all(torch.equal(x, y) for x, y in zip(before, trainer.policy.parameters()))  # the policy is frozen
    assert "critic/q_loss" in metrics and not any(k.startswith("actor/") for k in metrics)
    trainer.logger.close()
