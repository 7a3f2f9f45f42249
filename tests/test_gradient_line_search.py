"""scripts/gradient_line_search.py: its engine-vs-trainer log-prob check and its step arithmetic."""
import importlib.util
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("gradient_line_search", REPO / "scripts/gradient_line_search.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_line_search_pieces_on_guess_number(tmp_path, capsys):
    script = load_script()
    script.main(["--env.name", "guess_number", "--warm-start.steps", "5", "--", "--episodes", "16",
                 "--eval-episodes", "16", "--steps", "0.05"])
    lines = capsys.readouterr().out.splitlines()
    agreement = next(line for line in lines if line.startswith("engine vs trainer log-probs"))
    assert float(agreement.split("max difference ")[1].split()[0]) < 1e-4, agreement
    cosine = next(line for line in lines if line.startswith("two independent gradient estimates"))
    assert -1.0 <= float(cosine.split("cosine ")[1].split(",")[0]) <= 1.0
    assert any(line.startswith("step norm 0.05: ascent ") for line in lines), lines


def test_a_step_moves_the_parameters_by_the_given_norm():
    script = load_script()
    policy = torch.nn.Linear(3, 2)

    class Stub:  # the trainer pieces success_after touches
        cfg = None
        def __init__(self):
            self.policy, self.synced = policy, 0
        def sync_engine(self):
            self.synced += 1

    search = script.LineSearch.__new__(script.LineSearch)
    search.tr = Stub()
    search.play = lambda n, s, b: type("R", (), {"kept": lambda self: []})()
    theta0 = {k: v.clone() for k, v in policy.state_dict().items()}
    direction = torch.arange(8, dtype=torch.float32)
    assert search.success_after(theta0, direction, 0.5, 4) == 0.0
    moved = torch.cat([(theta0[k] - v).flatten() for k, v in policy.state_dict().items()])
    assert torch.allclose(moved, 0.5 * direction / direction.norm(), atol=1e-6)
    assert search.tr.synced == 1
