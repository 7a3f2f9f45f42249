"""Policy model and tokenizer.

The default policy is a tiny random-init Llama built in code, with an offline word-level tokenizer
built in code too, so nothing is downloaded. Known words (every word the built-in environments print,
and the numbers 0..100) are single tokens; any other text falls back to one token per character, so
encoding is lossless for every string of printable ASCII (tab and newline included); any other
character (non-ASCII, carriage return) becomes one `<unk>` token. `ModelConfig.path` loads any local
Hugging Face model folder (or a `.gguf` file with `gguf_file`) through the same code.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from fastarcher.lora import LoraSettings

ChatTemplateMode = Literal["auto", "on", "off"]
"""Dialogue rendering: the tokenizer's chat template when it has one ('auto'), always ('on'), never ('off')."""

PAD_TOKEN = "<pad>"
EOS_TOKEN = "<eos>"
UNK_TOKEN = "<unk>"
STOP_TEXT = "\n"
"""Every utterance ends with a newline: it is the stop token of generation."""


@dataclass(kw_only=True)
class ModelConfig:
    path: str | None = None
    """Local Hugging Face model folder to load; None builds the tiny built-in model."""
    gguf_file: str | None = None
    """GGUF file name inside `path` (loaded and dequantised by transformers; needs `gguf`)."""
    hidden_size: int = 64
    """Built-in model: width of the residual stream."""
    num_layers: int = 2
    """Built-in model: number of transformer blocks."""
    num_heads: int = 4
    """Built-in model: attention heads (hidden_size must be divisible by it)."""
    intermediate_size: int = 256
    """Built-in model: MLP width."""
    max_positions: int = 1024
    """Built-in model: maximum sequence length (prompt + dialogue)."""
    tie_embeddings: bool = True
    """Built-in model: one matrix for the input embeddings and the output projection. Untied, a gradient
    that raises an action's logit does not also move how that token reads when it is in the history."""
    chat_template: ChatTemplateMode = "auto"
    """Render every dialogue through the tokenizer's chat template (user turns for observations, assistant turns
    for replies, which then end with the template's end-of-turn token): auto = when the tokenizer has one (the
    built-in tokenizer has none); off = plain text, replies end with a newline (base models)."""
    system_prompt: str | None = None
    """With a chat template: a system turn before the first observation (None: the template's default, if any)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA adapters (peft) on the policy: only they train; the engine and the export get merged weights."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward instead of keeping them (training only; less
    memory for long dialogues, about one more forward of time)."""
    mixed_precision: Literal["auto", "bf16", "off"] = "auto"
    """Under torchrun (FSDP2): bf16 parameters and compute with fp32 gradient reduction and fp32 master weights
    in the optimizer. auto = bf16 on CUDA, off on CPU. A single plain process (no FSDP2) ignores it."""
    cpu_offload: bool = False
    """Under torchrun on CUDA: FSDP2 keeps parameter shards, gradients and AdamW state in CPU memory and moves
    each block to the GPU for its compute (CPUOffloadPolicy): for a policy that does not fit, at the cost of
    host-device copies every step. Ignored, with a note, where training runs on CPU."""
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa"] = "auto"
    """Attention kernel of the policy (transformers' attn_implementation). auto = flash_attention_2 on CUDA when
    the flash-attn package is installed (the [flash] extra), else sdpa. (transformers' eager kernel is not
    offered: with left padding its fully masked rows turn into NaN that reach real positions.)"""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Parameter dtype of the policy (training keeps optimizer math in this dtype)."""
    fused_head: bool = True
    """Training scores unconstrained utterances with the LM head fused into the log-prob (chunked, no
    (B, A, V) logits): 1.7x less step memory at vocabulary 32k, 2.9x at 128k, the same time at 32k and
    0.8x at 128k on CPU (the backward recomputes the logits). Constrained actions always use the logits."""

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_positions"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} ({getattr(self, name)}) must be positive")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_heads ({self.num_heads})"
            )


def builtin_vocabulary(words: tuple[str, ...]) -> list[str]:
    """Special tokens, printable characters, then the given words and 0..100 (deterministic order)."""
    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab: dict[str, None] = {}
    for token in [PAD_TOKEN, EOS_TOKEN, UNK_TOKEN, *chars, *words, *map(str, range(101))]:
        vocab.setdefault(token, None)
    return list(vocab)


def build_builtin_tokenizer(words: tuple[str, ...] | None = None):
    """A lossless word-level `PreTrainedTokenizerFast` made in code (no download).

    The pre-tokenizer regex matches a known word (longest first, not followed by a letter or digit),
    else any single character; `Fuse` decoding concatenates tokens, so decode(encode(s)) == s for every
    printable-ASCII string (other characters map to `<unk>`).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if words is None:
        from fastarcher.envs import VOCAB_WORDS

        words = tuple(VOCAB_WORDS)
    vocab = builtin_vocabulary(words)
    multi_char = sorted({w for w in vocab if len(w) > 1 and w not in (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)},
                        key=lambda w: (-len(w), w))
    pattern = r"(?:" + "|".join(re.escape(w) for w in multi_char) + r")(?![A-Za-z0-9])|[\s\S]"
    tokenizer = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN, unk_token=UNK_TOKEN
    )


def build_builtin_model(cfg: ModelConfig, vocab_size: int, pad_id: int, eos_id: int, attn: str = "sdpa") -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_positions,
        tie_word_embeddings=cfg.tie_embeddings,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=eos_id,
    )
    config._attn_implementation = attn
    return LlamaForCausalLM(config)


def load_tokenizer(cfg: ModelConfig):
    """The policy's tokenizer: the built-in one, or the one in `cfg.path` (pad token set)."""
    if cfg.path is None:
        return build_builtin_tokenizer()
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(cfg.path, **kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def attention_implementation(mode: str, device_type: str) -> str:
    """The attention kernel for `mode` on a device type: auto picks flash_attention_2 on CUDA when flash-attn
    is installed, else sdpa; an explicit flash_attention_2 without the package (or off CUDA) is refused."""
    import importlib.util

    have_flash = importlib.util.find_spec("flash_attn") is not None
    if mode == "auto":
        return "flash_attention_2" if device_type == "cuda" and have_flash else "sdpa"
    if mode == "flash_attention_2" and not (have_flash and device_type == "cuda"):
        raise ValueError("model.attn_implementation flash_attention_2 needs a CUDA device and the flash-attn package "
                         "(pip install -e '.[flash]'); use auto or sdpa")
    return mode


def load_policy(cfg: ModelConfig, device_type: str = "cpu"):
    """Return (model, tokenizer); the model is on CPU in `cfg.dtype`, in train mode, with the attention kernel
    `attention_implementation` picks for `device_type` (where training will run)."""
    dtype = getattr(torch, cfg.dtype)
    tokenizer = load_tokenizer(cfg)
    attn = attention_implementation(cfg.attn_implementation, device_type)
    if cfg.path is None:
        model = build_builtin_model(cfg, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, attn)
    else:
        from transformers import AutoModelForCausalLM

        kwargs = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
        model = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=dtype, attn_implementation=attn, **kwargs)
    model.to(dtype)
    model.config.use_cache = True
    return model, tokenizer


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` without special tokens (the trainer concatenates segments itself)."""
    return tokenizer.encode(text, add_special_tokens=False)


def encode_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    """`encode` of every text in one tokenizer call (a rollout turn's observations: one call instead of one per
    episode, the same ids)."""
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def stop_token_id(tokenizer) -> int:
    """The single token that ends an utterance (newline); models whose newline spans several tokens
    are not supported as policies."""
    ids = encode(tokenizer, STOP_TEXT)
    if len(ids) != 1:
        raise ValueError(f"the tokenizer encodes a newline as {len(ids)} tokens; fastarcher needs exactly one")
    return ids[0]


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Checkpoint every decoder layer (non-reentrant, so FSDP2's per-block hooks run again in the recompute)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"model.activation_checkpointing: {type(model).__name__} does not support it")
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:  # transformers before activation_checkpointing_enable
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of an HF causal LM (what FSDP2 shards one by one)."""
    base = getattr(model, "model", None) or getattr(model, "transformer", None)
    layers = getattr(base, "layers", None) or getattr(base, "h", None)
    if layers is None:
        raise ValueError(f"cannot find the transformer blocks of {type(model).__name__}")
    return list(layers)
