"""Attention kernel choice (`--model.attn-implementation`) and FSDP2 CPU offload (`--model.cpu-offload`)."""
import importlib.util

import pytest
import torch

from dist_helpers import tiny_policy
from fastarcher.model import ModelConfig, attention_implementation, load_policy
from fastarcher.train import main


def test_auto_picks_flash_only_on_cuda_with_the_package(monkeypatch):
    real = importlib.util.find_spec
    for installed in (False, True):
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a, _i=installed: (object() if _i else None) if name == "flash_attn" else real(name, *a))
        assert attention_implementation("auto", "cpu") == "sdpa"
        assert attention_implementation("auto", "cuda") == ("flash_attention_2" if installed else "sdpa")
        assert attention_implementation("sdpa", "cuda") == "sdpa"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a))
    with pytest.raises(ValueError, match=r"needs a CUDA device and the flash-attn package \(pip install -e '.\[flash\]'\)"):
        attention_implementation("flash_attention_2", "cuda")


def test_the_policy_is_built_with_the_chosen_kernel():
    sdpa, _ = load_policy(ModelConfig(attn_implementation="auto"), "cpu")
    assert sdpa.config._attn_implementation == "sdpa"
    eager, _ = load_policy(ModelConfig())
    eager.config._attn_implementation = "eager"  # transformers' reference kernel, unpadded input
    eager.load_state_dict(sdpa.state_dict())
    ids = torch.randint(3, 50, (2, 12))
    with torch.no_grad():
        assert torch.allclose(sdpa.double()(input_ids=ids).logits, eager.double()(input_ids=ids).logits, atol=1e-5)


def test_flash_without_a_gpu_is_a_one_line_refusal(tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["--config", "configs/tiny_cpu.yaml", "--model.attn-implementation", "flash_attention_2",
              "--log.run-dir", str(tmp_path / "run")])
    message = info.value.code
    assert message.startswith("config error: model.attn_implementation flash_attention_2 needs") and "\n" not in message
    assert not (tmp_path / "run").exists()


def test_cpu_offload_is_noted_and_ignored_on_cpu(tmp_path, capsys):
    from test_actor_step import make_trainer

    trainer = make_trainer(tmp_path, "--model.cpu-offload")
    out = capsys.readouterr()
    assert "model.cpu_offload applies under torchrun on CUDA" in out.out + out.err
    assert all(p.device.type == "cpu" for p in trainer.policy.parameters())
