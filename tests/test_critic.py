"""Double critic, target copy and Polyak update; reference: ArCHer archer/models/critic.py and θ̄ ← (1−τ)θ̄ + τθ."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastarcher.algos.archer import critic_loss, critic_targets
from fastarcher.critic import CriticConfig, DoubleCritic, last_token_pool, make_target, soft_update

VOCAB, PAD = 40, 0
CFG = CriticConfig(hidden_size=32, num_layers=2, num_heads=4, mlp_hidden=16, max_positions=64)


def make_critic(seed: int = 0, cfg: CriticConfig = CFG) -> DoubleCritic:
    torch.manual_seed(seed)
    return DoubleCritic(cfg, vocab_size=VOCAB, pad_id=PAD)


def random_inputs(B=3, S=7, A=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(1, VOCAB, (B, S), generator=g)
    a = torch.randint(1, VOCAB, (B, A), generator=g)
    return s, torch.ones_like(s), a, torch.ones_like(a)


def right_pad(ids, mask, extra):
    return (torch.nn.functional.pad(ids, (0, extra), value=PAD), torch.nn.functional.pad(mask, (0, extra), value=0))


def test_critic_outputs_are_float32_vectors():
    critic = make_critic()
    outs = critic(*random_inputs(B=5))
    assert len(outs) == 4
    for o in outs:
        assert o.shape == (5,) and o.dtype == torch.float32 and torch.isfinite(o).all()
    q1, q2, v1, v2 = outs
    assert not torch.allclose(q1, q2) and not torch.allclose(v1, v2)  # independent heads


def test_critic_config_validation_names_the_field():
    with pytest.raises(ValueError, match="critic.hidden_size"):
        CriticConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="critic.num_layers"):
        CriticConfig(num_layers=0)
    with pytest.raises(ValueError, match="critic.encoder"):
        CriticConfig(encoder="roberta")


def test_last_token_pool_picks_last_real_position():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).view(2, 4, 1)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert last_token_pool(hidden, mask).flatten().tolist() == [1.0, 7.0]
    left = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0]])  # last real at 2; all-pad row pools position 0
    assert last_token_pool(hidden, left).flatten().tolist() == [2.0, 4.0]


def test_critic_extra_right_padding_changes_nothing():
    critic = make_critic()
    s, sm, a, am = random_inputs()
    # rows of different real lengths: shorten row 0's state and row 2's action with padding
    sm[0, 4:] = 0
    s[0, 4:] = PAD
    am[2, 1:] = 0
    a[2, 1:] = PAD
    base = critic(s, sm, a, am)
    padded = critic(*right_pad(s, sm, 6), *right_pad(a, am, 4))
    for x, y in zip(base, padded):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)
    # and the padded positions' token ids are irrelevant
    s2 = s.clone()
    s2[0, 4:] = 17
    for x, y in zip(base, critic(s2, sm, a, am)):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)


def test_critic_pools_whole_sequence_not_first_token():
    critic = make_critic()
    s, sm, a, am = random_inputs()
    s2 = s.clone()
    s2[:, -1] = s[:, -1] % (VOCAB - 1) + 1  # a different token in 1..VOCAB-1 at the last position
    v_before = critic(s, sm, a, am)[2]
    v_after = critic(s2, sm, a, am)[2]
    assert (v_before - v_after).abs().min() > 0  # the last state token reaches the pooled embedding


def test_critic_v_heads_depend_on_state_only():
    critic = make_critic()
    s, sm, a, am = random_inputs()
    q1, q2, v1, v2 = critic(s, sm, a, am)
    a2 = (a + 5) % (VOCAB - 1) + 1
    q1b, q2b, v1b, v2b = critic(s, sm, a2, am)
    assert torch.equal(v1, v1b) and torch.equal(v2, v2b)
    assert (q1 - q1b).abs().max() > 0 and (q2 - q2b).abs().max() > 0


def test_target_form_equals_two_calls_bit_for_bit():
    """critic(s, a′, next=s′) gives Q(s, a′) of the first call and V(s′) of a second call on s′ (the two
    target calls of the critic step before they were merged), on rows of mixed lengths."""
    critic = make_critic().eval()
    g = torch.Generator().manual_seed(3)
    batch = 16

    def ragged(width):
        lengths = torch.randint(1, width + 1, (batch,), generator=g)
        lengths[0] = width
        mask = (torch.arange(width)[None] < lengths[:, None]).long()
        return torch.randint(1, VOCAB, (batch, width), generator=g) * mask, mask

    for s_width, n_width in [(7, 12), (12, 7), (9, 9)]:
        s, s_mask = ragged(s_width)
        n, n_mask = ragged(n_width)
        a, a_mask = ragged(3)
        f, f_mask = ragged(4)
        with torch.no_grad():
            tq1, tq2, _, _ = critic(s, s_mask, f, f_mask)
            _, _, tv1, tv2 = critic(n, n_mask, a, a_mask)
            q1, q2, v1, v2 = critic(s, s_mask, f, f_mask, n, n_mask)
        for merged, separate in [(q1, tq1), (q2, tq2), (v1, tv1), (v2, tv2)]:
            assert torch.equal(merged, separate)
    with pytest.raises(ValueError, match="both next_ids and next_mask"):
        critic(s, s_mask, f, f_mask, n, None)


def test_critic_encoder_layers_are_the_transformer_blocks():
    critic = make_critic()
    layers = critic.encoder_layers()
    assert len(layers) == CFG.num_layers
    assert all(layer is block for layer, block in zip(layers, critic.encoder.layers))


def test_make_target_is_frozen_independent_copy():
    critic = make_critic()
    target = make_target(critic)
    assert not target.training
    for (name, p), (_, tp) in zip(critic.named_parameters(), target.named_parameters()):
        assert torch.equal(p, tp), name
        assert p.data_ptr() != tp.data_ptr(), name
        assert not tp.requires_grad and p.requires_grad
    with torch.no_grad():
        for p in critic.parameters():
            p.add_(1.0)
    assert all(not torch.equal(p, tp) for p, tp in zip(critic.parameters(), target.parameters()))


def test_soft_update_matches_polyak_formula():
    online, target = make_critic(seed=0), make_critic(seed=1)
    before = {n: p.clone() for n, p in target.named_parameters()}
    soft_update(target, online, tau=0.25)
    for name, p in target.named_parameters():
        expected = 0.75 * before[name] + 0.25 * dict(online.named_parameters())[name]
        torch.testing.assert_close(p, expected, atol=1e-7, rtol=0), name
    # tau = 1 copies, tau = 0 leaves the target alone
    frozen = {n: p.clone() for n, p in target.named_parameters()}
    soft_update(target, online, tau=0.0)
    assert all(torch.equal(p, frozen[n]) for n, p in target.named_parameters())
    soft_update(target, online, tau=1.0)
    assert all(torch.equal(p, q) for p, q in zip(target.parameters(), online.parameters()))
    with pytest.raises(ValueError, match="tau"):
        soft_update(target, online, tau=1.5)


def test_no_gradient_reaches_target_critic():
    online = make_critic(seed=0)
    target = make_target(online)
    with torch.no_grad():  # make the two differ, so a leak would show up in values too
        for p in online.parameters():
            p.add_(0.01 * torch.randn_like(p))
    target_before = [p.clone() for p in target.parameters()]
    s, sm, a, am = random_inputs(B=4)
    s_next, snm, a_fresh, afm = random_inputs(B=4, seed=5)
    # target outputs computed WITHOUT a no_grad context: critic_targets alone must cut the graph
    _, _, tv1, tv2 = target(s_next, snm, a, am)
    tq1, tq2, _, _ = target(s, sm, a_fresh, afm)
    y = critic_targets(reward=torch.tensor([1.0, 0.0, -1.0, 0.5]), done=torch.tensor([0.0, 1.0, 0.0, 0.0]),
                       target_v1_next=tv1, target_v2_next=tv2, target_q1_fresh=tq1, target_q2_fresh=tq2, gamma=0.9)
    assert all(not t.requires_grad for t in y)
    q1, q2, v1, v2 = online(s, sm, a, am)
    loss, _ = critic_loss(q1=q1, q2=q2, v1=v1, v2=v2, y_q1=y[0], y_q2=y[1], y_v1=y[2], y_v2=y[3])
    loss.backward()
    torch.optim.SGD(online.parameters(), lr=0.1).step()
    assert all(p.grad is None for p in target.parameters())
    assert all(torch.equal(p, b) for p, b in zip(target.parameters(), target_before))
    heads = [online.q1[0].weight, online.v1[0].weight, online.encoder.embed_tokens.weight]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads)


def _tiny_backbone():
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(3)
    return LlamaModel(LlamaConfig(vocab_size=VOCAB, hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                  pad_token_id=PAD, bos_token_id=None, eos_token_id=None))


def test_policy_encoder_uses_backbone_without_owning_or_training_it():
    backbone = _tiny_backbone()
    critic = DoubleCritic(CriticConfig(encoder="policy", mlp_hidden=8), vocab_size=VOCAB, pad_id=PAD, backbone=backbone)
    assert critic.encoder_layers() == []
    backbone_ids = {id(p) for p in backbone.parameters()}
    assert not backbone_ids & {id(p) for p in critic.parameters()}
    assert critic.q1[0].in_features == 2 * 24 and critic.v1[0].in_features == 24
    q1, q2, v1, v2 = critic(*random_inputs())
    (q1 + q2 + v1 + v2).sum().backward()
    assert all(p.grad is None for p in backbone.parameters())
    assert critic.q1[0].weight.grad is not None
    target = make_target(critic)
    assert target.backbone is backbone  # shared, not copied
    # with backbone_grad the critic loss reaches the backbone
    critic_g = DoubleCritic(CriticConfig(encoder="policy", mlp_hidden=8, backbone_grad=True), vocab_size=VOCAB,
                            pad_id=PAD, backbone=backbone)
    critic_g(*random_inputs())[0].sum().backward()
    assert backbone.embed_tokens.weight.grad is not None


_DTENSOR_SCRIPT = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from fastarcher.critic import CriticConfig, DoubleCritic, make_target, soft_update
    dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
    torch.manual_seed(0)
    cfg = CriticConfig(hidden_size=16, num_layers=1, num_heads=2, mlp_hidden=8)
    online = DoubleCritic(cfg, vocab_size=30, pad_id=0)
    target = make_target(online)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    ref = {n: 0.9 * t.detach().clone() + 0.1 * o.detach() for (n, t), (_, o)
           in zip(target.named_parameters(), online.named_parameters())}
    for m in (online, target):
        for block in m.encoder_layers():
            fully_shard(block)
        fully_shard(m)
    assert type(next(target.parameters())).__name__ == "DTensor"
    soft_update(target, online, tau=0.1)
    for n, p in target.named_parameters():
        torch.testing.assert_close(p.full_tensor(), ref[n], atol=1e-6, rtol=0)
    dist.destroy_process_group()
    print("OK")
""")


def test_soft_update_on_fsdp2_dtensor_params(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", _DTENSOR_SCRIPT, str(tmp_path / "pg")], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def extended_batch(batch=12, s_width=9, extra=6, seed=4):
    """Right-padded s of ragged lengths and s′ = s ⊕ (1..extra more tokens), as with no context window."""
    g = torch.Generator().manual_seed(seed)
    s_len = torch.randint(1, s_width + 1, (batch,), generator=g)
    n_len = s_len + torch.randint(1, extra + 1, (batch,), generator=g)
    n_width = int(n_len.max())
    n = torch.randint(1, VOCAB, (batch, n_width), generator=g)
    n_mask = (torch.arange(n_width)[None] < n_len[:, None]).long()
    s_mask = (torch.arange(s_width)[None] < s_len[:, None]).long()
    s = n[:, :s_width] * s_mask
    return s, s_mask, n * n_mask, n_mask


def count_encoder_calls(critic):
    calls = []
    critic.encoder.register_forward_hook(lambda module, args, out: calls.append(1))
    return calls


def test_prefix_rows_by_hand():
    from fastarcher.critic import prefix_rows

    s, s_mask, n, n_mask = extended_batch()
    assert prefix_rows(s, s_mask, n, n_mask).all()
    slid = n.clone()
    slid[3, 0] = (slid[3, 0] % (VOCAB - 1)) + 1  # row 3's window slid: its s′ no longer starts with s
    assert prefix_rows(s, s_mask, slid, n_mask).tolist() == [i != 3 for i in range(12)]
    assert not prefix_rows(n, n_mask, s, s_mask).all()  # s′ shorter than s
    empty = s_mask.clone()
    empty[0] = 0
    assert not prefix_rows(s, empty, n, n_mask)[0]


def test_target_form_embeds_s_inside_the_pass_over_s_next_when_it_extends_s():
    """s′ = s ⊕ a ⊕ o on every row: one encoder pass over s′ gives V(s′) and s's embedding (causal attention),
    so the target call makes two passes instead of three; values equal the separate passes' (to float32
    rounding: the Llama RMSNorm computes in float32 whatever the model dtype)."""
    critic = make_critic().double().eval()
    calls = count_encoder_calls(critic)
    s, s_mask, n, n_mask = extended_batch()
    f, f_mask = torch.randint(1, VOCAB, (12, 4)), torch.ones(12, 4, dtype=torch.long)
    with torch.no_grad():
        critic.share_state_pass = False
        separate = critic(s, s_mask, f, f_mask, n, n_mask)
        separate_calls = len(calls)
        critic.share_state_pass = True
        shared = critic(s, s_mask, f, f_mask, n, n_mask)
    assert separate_calls == 3 and len(calls) - separate_calls == 2
    for x, y in zip(shared, separate):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
    assert not torch.equal(shared[0], critic(n, n_mask, f, f_mask)[0])  # Q pooled at s's end, not s′'s


def test_rows_whose_window_slid_embed_s_apart_and_the_rest_share_the_pass():
    """Row 5's s′ does not start with its s: the pass over s′ serves the other rows' s, row 5's s gets a pass
    of its own (one row), and every output equals the three separate passes' (to float32 rounding)."""
    critic = make_critic().double().eval()
    calls = count_encoder_calls(critic)
    s, s_mask, n, n_mask = extended_batch()
    n[5, 0] = (n[5, 0] % (VOCAB - 1)) + 1
    f, f_mask = torch.randint(1, VOCAB, (12, 4)), torch.ones(12, 4, dtype=torch.long)
    rows = []
    critic.encoder.register_forward_pre_hook(lambda module, args, kwargs: rows.append(kwargs["input_ids"].shape[0]),
                                             with_kwargs=True)
    with torch.no_grad():
        shared = critic(s, s_mask, f, f_mask, n, n_mask)
        critic.share_state_pass = False
        separate = critic(s, s_mask, f, f_mask, n, n_mask)
    assert rows[:3] == [12, 1, 12] and len(calls) == 6  # s′, the slid row's s, a′; then three separate passes
    for x, y in zip(shared, separate):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


def test_the_shared_state_pass_can_be_turned_off():
    import dataclasses

    from fastarcher.train import parse_config

    assert make_critic().share_state_pass
    assert not make_critic(cfg=dataclasses.replace(CFG, share_state_pass=False)).share_state_pass
    flags = ["--config", "configs/tiny_cpu.yaml"]
    assert parse_config(flags).critic.share_state_pass
    assert not parse_config(flags + ["--critic.no-share-state-pass"]).critic.share_state_pass


def test_no_row_extending_its_state_keeps_the_three_passes_bit_for_bit():
    critic = make_critic().eval()
    s, s_mask, n, n_mask = extended_batch()
    n[:, 0] = (n[:, 0] % (VOCAB - 1)) + 1  # every window slid
    f, f_mask = torch.randint(1, VOCAB, (12, 4)), torch.ones(12, 4, dtype=torch.long)
    with torch.no_grad():
        shared = critic(s, s_mask, f, f_mask, n, n_mask)
        critic.share_state_pass = False
        separate = critic(s, s_mask, f, f_mask, n, n_mask)
    for x, y in zip(shared, separate):
        assert torch.equal(x, y)


def test_a_sharded_critic_takes_the_same_passes_on_every_rank():
    """2 processes (gloo): only rank 0 has a row whose window slid; rank 1 embeds one unused row so that the
    sharded passes (collectives) line up, and both ranks equal the separate passes."""
    from dist_helpers import dist_check_results

    for rank in dist_check_results():
        assert rank["critic_state_pass"]["max_diff"] < 1e-6
