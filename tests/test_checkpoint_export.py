"""Hugging Face export of the trained policy (fastarcher/export.py).

Reference: the trained policy's own logits and the built-in tokenizer's own encoding; the exported
folder is loaded back with the plain transformers Auto* classes.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY = ("--config configs/tiny_cpu.yaml --rollout.num-envs 4 --eval.episodes 4 --eval.every 0 "
        "--eval.no-random-baseline --archer.batch-size 8 --archer.warmup-iterations 0 --replay.capacity 64 "
        "--log.no-progress --checkpoint.no-save-on-sigterm --iterations 2").split()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import os

    from fastarcher.dist import DistInfo
    from fastarcher.train import parse_config
    from fastarcher.trainer import Trainer

    cwd, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(REPO)
    torch.set_num_threads(1)
    try:
        run_dir = tmp_path_factory.mktemp("export") / "run"
        cfg = parse_config([*TINY, "--log.run-dir", str(run_dir)])  # export_hf is on by default
        cfg.validate(world_size=1)
        trainer = Trainer(cfg, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
        trainer.fit()
        trainer.save_final()
        trainer.logger.close()
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    return trainer, run_dir


def _same_model(trainer, folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = "Guess a number from 1 to 16.\n7\nhigher\n12\n"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids == trainer.tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    x = torch.tensor([ids])
    with torch.no_grad():
        trainer.policy.eval()
        assert torch.equal(model(x).logits, trainer.policy(x).logits)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied


def test_run_ends_with_a_loadable_hugging_face_folder(trained):
    trainer, run_dir = trained
    folder = run_dir / "hf_policy"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert not any(p.name.startswith(".tmp-") for p in run_dir.iterdir())
    _same_model(trainer, folder)


def test_export_cli_from_a_checkpoint_or_a_run_folder(trained, tmp_path):
    from fastarcher.export import main

    trainer, run_dir = trained
    out = tmp_path / "from_checkpoint"
    main([str(run_dir / "checkpoints" / "iter_000002"), str(out)])
    _same_model(trainer, out)
    out = tmp_path / "from_run_folder"  # through the real command line once
    done = subprocess.run([sys.executable, "-m", "fastarcher.export", str(run_dir), str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    _same_model(trainer, out)


def test_export_cli_refuses_a_damaged_checkpoint(trained, tmp_path):
    import shutil

    from fastarcher.export import main

    _, run_dir = trained
    ckpt = tmp_path / "iter_000002"
    shutil.copytree(run_dir / "checkpoints" / "iter_000002", ckpt)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    (ckpt / "model" / "__0_0.distcp").write_bytes(b"\0" * manifest["files"]["model/__0_0.distcp"]["size"])
    with pytest.raises(SystemExit, match=r"export error: .*fails its CRC-32 check"):
        main([str(ckpt), str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match=r"export error: .* is neither a checkpoint"):
        main([str(empty), str(tmp_path / "out")])


def test_the_export_says_how_the_policy_was_used(trained):
    _, run_dir = trained
    folder = run_dir / "hf_policy"
    facts = json.loads((folder / "fastarcher.json").read_text())
    assert facts == {"stop_token_id": facts["stop_token_id"], "stop_text": "\n", "max_new_tokens": 4,
                     "context_tokens": 22, "constrained_actions": True, "env": "frozenlake", "algo": "archer",
                     "chat_template": False, "prompt_head": "", "turn_head": "", "turn_tail": "", "system_prompt": None}
    gen = json.loads((folder / "generation_config.json").read_text())
    assert facts["stop_token_id"] in gen["eos_token_id"] and gen["max_new_tokens"] == 4
    assert not gen.get("do_sample", False)
    card = (folder / "README.md").read_text()
    assert "last 22 tokens" in card and "constrained" in card and f"token id {facts['stop_token_id']}" in card


def test_plain_generate_on_an_exported_free_form_policy_gives_the_engines_greedy_replies(tmp_path):
    """A policy trained with free decoding (the qa env on sums, a short warm start so it has learnt to end
    its replies), exported and run with nothing but transformers' `generate`: the same tokens as fastarcher's
    engine under greedy decoding, stop token included."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastarcher.rollout.base import SamplingParams
    from fastarcher.rollout.hf_engine import HFEngine

    run_dir = tmp_path / "run"
    flags = ["--config", "configs/math_rlvr_traces_cpu.yaml", "--iterations", "1", "--warm-start.steps", "40",
             "--rollout.num-envs", "16", "--eval.episodes", "8", "--eval.no-random-baseline", "--log.no-progress",
             "--trace.influence.no-enabled", "--trace.entropy.no-enabled", "--device", "cpu", "--log.run-dir", str(run_dir)]
    done = subprocess.run([sys.executable, "-m", "fastarcher.train", *flags], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = run_dir / "hf_policy"
    assert json.loads((folder / "fastarcher.json").read_text())["constrained_actions"] is False
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    records = [json.loads(line) for line in (REPO / "examples" / "data" / "sums.jsonl").read_text().splitlines()]
    prompts = [tokenizer.encode(f"Question: {r['question']}\nAnswer:\n", add_special_tokens=False) for r in records]
    stop = json.loads((folder / "fastarcher.json").read_text())["stop_token_id"]
    engine = HFEngine(AutoModelForCausalLM.from_pretrained(folder), pad_id=tokenizer.pad_token_id,
                      device=torch.device("cpu"))
    ours = engine.generate(prompts, SamplingParams(greedy=True, max_new_tokens=3, stop_token_id=stop)).token_ids
    plain = []
    with torch.no_grad():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
            plain.append(out[0, len(ids):].tolist())
    assert plain == ours
    assert sum(reply[-1:] == [stop] for reply in ours) >= 50  # most replies end with the learnt stop token
