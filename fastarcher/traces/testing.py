"""Small helpers shared by the trace tests and benchmarks: a tiny random-init causal LM and log-probs.

    model = tiny_causal_lm(dtype=torch.float64, seed=0)              # Qwen2: vocab 64, hidden 32, 2 layers
    logp = token_logprobs(model, token_ids)                          # (B, T), value at the target index
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["tiny_causal_lm", "token_logprobs", "shift_logprobs", "policy_gradient_loss", "demo_decode",
           "write_demo_run"]


def tiny_causal_lm(*, arch: str = "qwen2", vocab: int = 64, hidden: int = 32, layers: int = 2, heads: int = 4,
                   kv_heads: int = 2, intermediate: int = 64, dropout: float = 0.0, dtype: torch.dtype = torch.float64,
                   seed: int = 0) -> nn.Module:
    """A randomly initialised transformers Qwen2 or Llama causal LM built in code (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}[arch]
    config = config_cls(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        num_key_value_heads=kv_heads, intermediate_size=intermediate, max_position_embeddings=512,
                        attention_dropout=dropout, tie_word_embeddings=False, attn_implementation="eager")
    torch.manual_seed(seed)
    return model_cls(config).to(dtype)


def shift_logprobs(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits, (B, T) ids -> (B, T) log pi(token_ids[b, t] | < t) at index t; index 0 is 0."""
    logits = logits[:, :-1]
    logp = torch.log_softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, -1)
    picked = logp.gather(-1, token_ids[:, 1:, None]).squeeze(-1)  # (B, T - 1)
    return torch.cat([picked.new_zeros(picked.shape[0], 1), picked], dim=1)


def token_logprobs(model: nn.Module, token_ids: torch.Tensor) -> torch.Tensor:
    return shift_logprobs(model(token_ids).logits, token_ids)


def policy_gradient_loss(logp: torch.Tensor, response_mask: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """-mean_b( A_b * sum_t mask * log pi ): the ArCHer actor loss shape, for tests and benchmarks."""
    advantages = advantages[:, None] if advantages.dim() == 1 else advantages
    return -(advantages * logp * response_mask.to(logp.dtype)).sum(1).mean()


DEMO_VOCAB = (
    ["<pad>", "\n", ".", ",", "?", "!", " guess", " is", " the", " number", " higher", " lower", " than", " my",
     " answer", " I", " think", " it", " maybe", " correct", " wrong", " try", " again", " next", " so", " between",
     " and", " done", " ok", " hmm", " let", " me"]
    + [f" {i}" for i in range(1, 17)]
    + [" a", " b", " yes", " no", " turn", " step", " small", " big", " :", " (", ")", " -", " +", " =", "é", " ∑"]
)


def demo_decode(ids) -> str:
    """Text of token ids in the 64-piece demo vocabulary (a stand-in tokenizer for tests and demos)."""
    return "".join(DEMO_VOCAB[int(i) % len(DEMO_VOCAB)] for i in ids)


def write_demo_run(run_dir, *, steps: int = 4, batch: int = 6, prompt: int = 5, length: int = 24, seed: int = 0,
                   influence_overrides: dict | None = None) -> None:
    """Train the tiny model for a few policy-gradient steps with both traces on, writing a run folder."""
    from .capture import InfluenceTracer
    from .config import EntropyTraceConfig, InfluenceTraceConfig
    from .entropy import EntropyTracer

    model = tiny_causal_lm(dtype=torch.float32, seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(60.0)  # peaked, varied next-token distributions, like a trained model
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    influence = InfluenceTracer(InfluenceTraceConfig(enabled=True, module_name_filter=("down_proj", "lm_head"),
                                                     **(influence_overrides or {})), model, run_dir)
    entropy = EntropyTracer(EntropyTraceConfig(enabled=True), run_dir)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        ids = torch.randint(1, 64, (batch, length), generator=g)
        mask = torch.zeros(batch, length, dtype=torch.bool)
        mask[:, prompt:] = True
        mask[batch - 1, length - 6:] = False  # one shorter response
        groups = torch.arange(batch) // 3
        rewards = torch.rand(batch, generator=g)
        advantages = rewards - rewards.view(-1, 3).mean(1).repeat_interleave(3)
        texts = [demo_decode(ids[b][mask[b]].tolist()) for b in range(batch)]
        with influence.capture(step, response_mask=mask, token_ids=ids, group_ids=groups, rewards=rewards,
                               advantages=advantages):
            logits = model(ids).logits
            logp = shift_logprobs(logits, ids)
            loss = policy_gradient_loss(logp, mask, advantages)
            loss.backward()
        with torch.no_grad():
            log_probs = torch.log_softmax(logits[:, :-1], -1)
            token_entropy = -(log_probs.exp() * log_probs).sum(-1)  # (B, T - 1): entropy of the token at t + 1
            token_entropy = torch.cat([token_entropy.new_zeros(batch, 1), token_entropy], 1)
        entropy.record(step, token_entropy, mask, ids, texts=texts, decode=demo_decode, group_ids=groups,
                       rewards=rewards, advantages=advantages)
        influence.finish_step(step, texts=texts, decode=demo_decode)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    influence.close()
