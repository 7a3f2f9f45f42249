"""Critic trunks beyond the random-init encoder: one loaded from a local Hugging Face folder
(`--critic.encoder-path`: the folder's weights, a vocabulary that cannot read the policy's ids refused) and
the policy's own trunk (`--critic.encoder policy`, called through the policy's root so FSDP2 gathers it);
both train under torchrun."""
import json

import pytest
import torch

from dist_helpers import describe, run_torchrun, tiny_policy
from fastarcher.config import TrainConfig
from fastarcher.critic import CriticConfig, DoubleCritic, encoder_blocks
from fastarcher.model import build_builtin_tokenizer


@pytest.fixture(scope="module")
def encoder_folder(tmp_path_factory):
    """A pretrained-looking causal LM of the policy's family (the built-in architecture, wider than the
    default critic), saved as a Hugging Face folder."""
    folder = tmp_path_factory.mktemp("encoder")
    model, _ = tiny_policy(torch.float32, seed=3, init_std=0.3, hidden_size=48, num_heads=4, num_layers=3)
    model.save_pretrained(folder)
    return folder, {k: v.clone() for k, v in model.model.state_dict().items()}


def test_the_critic_trunk_is_the_folders_base_model(encoder_folder):
    folder, saved = encoder_folder
    tokenizer = build_builtin_tokenizer()
    critic = DoubleCritic(CriticConfig(encoder_path=str(folder)), vocab_size=len(tokenizer), pad_id=0)
    loaded = critic.encoder.state_dict()
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert len(critic.encoder_layers()) == 3 and critic.q1[0].in_features == 2 * 48
    ids = torch.randint(3, 200, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    q1, q2, v1, v2 = critic(ids, mask, ids[:, :3], mask[:, :3])
    assert q1.shape == v1.shape == (2,) and all(torch.isfinite(t).all() for t in (q1, q2, v1, v2))
    # a pretrained trunk may attend both ways (RoBERTa-like): s is never embedded inside the pass over s′
    assert not critic.share_state_pass


def test_a_vocabulary_smaller_than_the_policys_is_refused(encoder_folder):
    folder, _ = encoder_folder
    with pytest.raises(ValueError, match="vocabulary of .* tokens, the policy's tokenizer 100000"):
        DoubleCritic(CriticConfig(encoder_path=str(folder)), vocab_size=100_000, pad_id=0)


def test_encoder_blocks_find_decoder_and_encoder_layouts():
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=32))
    assert encoder_blocks(bert) == list(bert.encoder.layer)


def test_the_config_check_names_a_bad_encoder_path(tmp_path):
    with pytest.raises(ValueError, match="not a local Hugging Face model folder"):
        TrainConfig(critic=CriticConfig(encoder_path=str(tmp_path))).validate()
    with pytest.raises(ValueError, match="use critic.encoder separate"):
        TrainConfig(critic=CriticConfig(encoder="policy", encoder_path=str(tmp_path))).validate()


def test_torchrun_trains_a_sharded_pretrained_critic(encoder_folder, tmp_path):
    folder, _ = encoder_folder
    run_dir = tmp_path / "run"
    proc = run_torchrun(["-m", "fastarcher.train", "--config", "configs/tiny_cpu.yaml", "--device", "cpu",
                         "--iterations", "2", "--rollout.num-envs", "4", "--eval.episodes", "4", "--eval.no-random-baseline",
                         "--archer.warmup-iterations", "1", "--archer.batch-size", "4", "--archer.critic-epochs", "2",
                         "--archer.actor-epochs", "1", "--log.no-progress", "--critic.encoder-path", str(folder),
                         "--log.run-dir", str(run_dir)], timeout=300)
    assert proc.returncode == 0, describe(proc)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["critic/q_loss"])) for r in rows[1:])


def test_the_policy_trunk_through_the_root_embeds_as_the_base_model():
    """encoder="policy" is handed the whole causal LM (so FSDP2's root hooks run); its pooled embedding is the
    base model's last hidden state, and backbone_grad still reaches the trunk."""
    policy, _ = tiny_policy(torch.float64, seed=0, init_std=0.3)
    critic = DoubleCritic(CriticConfig(encoder="policy", mlp_hidden=8), vocab_size=300, pad_id=0, backbone=policy).double()
    ids = torch.randint(3, 200, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        via_root = critic.embed(ids, mask)
        direct = policy.model(input_ids=ids, attention_mask=mask,
                              position_ids=(mask.cumsum(1) - 1).clamp(min=0), use_cache=False).last_hidden_state
        lengths = mask.sum(1) - 1
        torch.testing.assert_close(via_root, direct[torch.arange(3), lengths], rtol=0, atol=0)
    grad_critic = DoubleCritic(CriticConfig(encoder="policy", mlp_hidden=8, backbone_grad=True), vocab_size=300,
                               pad_id=0, backbone=policy).double()
    grad_critic(ids, mask, ids[:, :2], mask[:, :2])[0].sum().backward()
    assert policy.model.layers[0].mlp.down_proj.weight.grad is not None


@pytest.mark.parametrize("backbone_grad", [pytest.param(False, marks=pytest.mark.slow), True])
def test_torchrun_trains_a_critic_on_the_sharded_policy_trunk(tmp_path, backbone_grad):
    run_dir = tmp_path / "run"
    proc = run_torchrun(["-m", "fastarcher.train", "--config", "configs/tiny_cpu.yaml", "--device", "cpu",
                         "--iterations", "2", "--rollout.num-envs", "4", "--eval.episodes", "4", "--eval.no-random-baseline",
                         "--archer.warmup-iterations", "1", "--archer.batch-size", "4", "--archer.critic-epochs", "2",
                         "--archer.actor-epochs", "1", "--log.no-progress", "--critic.encoder", "policy",
                         f"--critic.{'' if backbone_grad else 'no-'}backbone-grad", "--log.run-dir", str(run_dir)],
                        timeout=300)
    assert proc.returncode == 0, describe(proc)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert "actor/pg_loss" in rows[-1] and all(torch.isfinite(torch.tensor(r["critic/q_loss"])) for r in rows[1:])
