"""Export the trained policy as a standard Hugging Face folder (`save_pretrained` + tokenizer).

    python -m fastarcher.export runs/tiny_cpu/checkpoints/iter_000040 exported/   # from a checkpoint
    python -m fastarcher.export runs/tiny_cpu exported/                           # newest checkpoint of a run

The trainer calls `export_policy` at the end of a run (`checkpoint.export_hf`, into run_dir/hf_policy).
With FSDP2 the shards are gathered into full tensors (a collective: every rank calls it) and rank 0
writes the folder; the result loads anywhere with `AutoModelForCausalLM.from_pretrained(folder)` and
`AutoTokenizer.from_pretrained(folder)`. The folder is written under a temporary name and renamed, so
a crash never leaves a half-written export.

With the run's config (`run_config`, the trainer and checkpoints pass it) the folder also says how the
policy was used, so that plain `transformers` generation behaves like fastarcher's engine:
`generation_config.json` stops at the utterance stop token (newline) as well as at EOS, greedy, with the
run's `max_new_tokens`; `fastarcher.json` holds the same facts machine-readably (stop token, context
window, whether decoding was constrained to an action set, env, algorithm); `README.md` explains them.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU tensors of `model` on rank 0, an empty dict elsewhere (collective)."""
    sharded = any(hasattr(p, "full_tensor") for p in model.parameters())
    if not sharded:
        return {k: v.detach().to("cpu") for k, v in model.state_dict().items()} if _rank() == 0 else {}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


@contextlib.contextmanager
def _quiet_transformers():
    """No 'Writing model shards' progress bar in the training log."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def usage_facts(tokenizer, run_config: dict) -> dict:
    """What a user of the exported policy must reproduce to get the trained behaviour (plain data)."""
    from fastarcher.chat import dialogue_format, stop_id_of

    rollout, env, model = run_config.get("rollout", {}), run_config.get("env", {}), run_config.get("model", {})
    fmt = dialogue_format(tokenizer, model.get("chat_template", "auto"), model.get("system_prompt"))
    return {
        "stop_token_id": stop_id_of(tokenizer, fmt),
        **fmt.facts(),
        "system_prompt": model.get("system_prompt"),
        "max_new_tokens": int(rollout.get("max_new_tokens", 16)),
        "context_tokens": int(rollout.get("context_tokens", 0)),
        "constrained_actions": bool(rollout.get("constrain_actions", True)),
        "env": str(env.get("name", "")),
        "algo": str(run_config.get("algo", "")),
    }


def _card(facts: dict) -> str:
    window = (f"The policy saw only the last {facts['context_tokens']} tokens of the dialogue: feed it the same "
              f"window (`ids[-{facts['context_tokens']}:]`), or it meets contexts it was never trained on."
              if facts["context_tokens"] else "The policy saw the whole dialogue (no context window).")
    constrained = ("Decoding was constrained to the environment's action set during training (fastarcher adds the "
                   "stop token after a complete action): unconstrained `generate` can write text outside that set."
                   if facts["constrained_actions"] else
                   "Decoding was free (unconstrained), as plain `generate` is: its greedy replies are the engine's.")
    if facts.get("chat_template"):
        dialogue = (f"Each reply of the agent is one assistant turn that ends with the chat template's end-of-turn "
                    f"token {facts['stop_text']!r} (token id {facts['stop_token_id']}), at most "
                    f"{facts['max_new_tokens']} tokens. The dialogue is the tokenizer's chat template: each "
                    f"observation a user turn, each reply an assistant turn, then the generation prompt "
                    f"(`apply_chat_template(messages, add_generation_prompt=True)`"
                    + (", with the system turn `system_prompt` of `fastarcher.json` first" if facts.get("system_prompt") else "") + ").")
    else:
        dialogue = (f"Each reply of the agent is one utterance that ends with a newline (token id "
                    f"{facts['stop_token_id']}), at most {facts['max_new_tokens']} tokens; the dialogue is the plain "
                    f"concatenation of observations and replies, tokenised with the tokenizer in this folder.")
    return f"""# fastarcher policy ({facts['algo']} on {facts['env']})

A causal LM trained by fastarcher. {dialogue}

{window}

{constrained}

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(FOLDER)
tokenizer = AutoTokenizer.from_pretrained(FOLDER)
ids = tokenizer(dialogue_so_far, return_tensors="pt").input_ids
reply = model.generate(ids)[0, ids.shape[1]:]   # generation_config.json: greedy, stops at the reply's end
```

`fastarcher.json` holds these facts for programs.
"""


def _write_usage(folder: Path, tokenizer, run_config: dict) -> None:
    import json

    from transformers import GenerationConfig

    facts = usage_facts(tokenizer, run_config)
    stops = [facts["stop_token_id"]] + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    GenerationConfig(eos_token_id=list(dict.fromkeys(stops)), pad_token_id=tokenizer.pad_token_id, do_sample=False,
                     max_new_tokens=facts["max_new_tokens"]).save_pretrained(folder)
    (folder / "fastarcher.json").write_text(json.dumps(facts, indent=2) + "\n")
    (folder / "README.md").write_text(_card(facts))


def export_policy(policy: nn.Module, tokenizer, out_dir: str | Path, *, run_config: dict | None = None) -> Path:
    """Write `policy` (possibly FSDP2-sharded) and `tokenizer` to `out_dir` as a Hugging Face folder; with the
    run's config (a `TrainConfig` as a dict), also how to use it outside fastarcher (module docstring)."""
    from transformers import AutoModelForCausalLM

    from fastarcher.lora import has_lora, merged_tensors

    out_dir = Path(out_dir)
    if has_lora(policy):  # adapters merged into their base weights, under the plain architecture's names
        state = {name: gather().to("cpu") for name, _, gather in merged_tensors(policy)}  # collective
        state = state if _rank() == 0 else {}
    else:
        state = full_state_dict(policy)
    if _rank() == 0:
        config = policy.config
        with torch.device("meta"):
            clean = AutoModelForCausalLM.from_config(config, dtype=next(iter(state.values())).dtype)
        missing, unexpected = clean.load_state_dict(state, strict=False, assign=True)
        tied = set()
        if getattr(config, "tie_word_embeddings", False):  # lm_head follows the embedding after tie_weights()
            tied = {k for k in missing if k.endswith("lm_head.weight")}
        if set(missing) - tied or unexpected:
            raise RuntimeError(f"policy state does not fit {type(clean).__name__}: missing "
                               f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}")
        clean.tie_weights()
        tmp = out_dir.with_name(f".tmp-{out_dir.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        with _quiet_transformers():
            clean.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            if run_config is not None:
                _write_usage(tmp, tokenizer, run_config)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return out_dir


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Export the policy stored in a fastarcher checkpoint (single process; reads only the policy)."""
    from fastarcher.checkpoint import (CheckpointError, check_checkpoint, latest_checkpoint, load_dcp,
                                       read_run_state, tied_aliases)
    from fastarcher.dist import seed_everything
    from fastarcher.lora import LoraSettings, apply_lora
    from fastarcher.model import ModelConfig, load_policy

    path = Path(checkpoint)
    if not (path / "manifest.json").is_file():
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"{path} is neither a checkpoint (no manifest.json) nor a folder holding one")
        path = found
    problems = check_checkpoint(path)
    if problems:
        raise CheckpointError(f"{path} cannot be exported: " + "; ".join(problems))
    run_config = read_run_state(path)["config"]
    settings = dict(run_config["model"])
    lora = LoraSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings.pop("lora", {}).items()})
    seed_everything(int(run_config.get("seed", 0)))  # a built-in base is the run's seeded init, as in training
    policy, tokenizer = load_policy(ModelConfig(**settings))
    if lora.enabled:  # the checkpoint holds the adapters; the base weights are model.path's
        apply_lora(policy, lora)
        state = {"policy": {k: v for k, v in policy.state_dict().items() if ".lora_" in k}}
    else:
        state = {"policy": {k: v for k, v in policy.state_dict().items() if k not in tied_aliases(policy)}}
    load_dcp(state, path / "model")  # in place, into the policy's own tensors (tied ones follow)
    return export_policy(policy, tokenizer, out_dir, run_config=run_config)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export a fastarcher checkpoint's policy as a Hugging Face folder")
    parser.add_argument("checkpoint", help="checkpoint folder (iter_*) or a run folder (its newest checkpoint)")
    parser.add_argument("out", help="output folder (replaced if it exists)")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out)
    except (ValueError, RuntimeError) as error:
        raise SystemExit(f"export error: {error}") from None
    print(f"exported the policy of {args.checkpoint} to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
