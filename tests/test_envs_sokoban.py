"""Sokoban rules (fastarcher/envs/sokoban.py): push mechanics and gym-sokoban rewards, generation, solver."""
import pytest
import torch

from fastarcher.envs import EnvConfig, Sokoban, SokobanConfig
from fastarcher.envs.evaluate import evaluate_policy
from fastarcher.envs.sokoban import solve, states_by_solution_length

torch.manual_seed(0)

# Box two cells left of its target, player behind it.
CORRIDOR = ["######", "#@$_.#", "######"]


def loaded(rows, cfg=None) -> Sokoban:
    env = Sokoban(cfg)
    env.reset(0)
    env.load_room(rows)
    return env


def test_render_uses_the_documented_legend():
    env = loaded(["#######", "#@$_.*#", "#_$_._#", "#######"])
    assert env.render() == "#######\n#@$_.*#\n#_$_._#\n#######\n"
    assert env.player == (1, 1) and env.boxes == {(1, 2), (1, 5), (2, 2)} and env.targets == {(1, 4), (1, 5), (2, 4)}
    env = loaded(["#####", "#+_$#", "#####"])
    assert env.render() == "#####\n#+_$#\n#####\n" and env.targets == {(1, 1)}


def test_push_onto_target_pays_step_cost_box_bonus_and_solve_bonus():
    env = loaded(CORRIDOR)
    obs, reward, done, info = env.step("right")
    assert (obs, reward, done, info["success"]) == ("######\n#_@$.#\n######\n", pytest.approx(-0.1), False, False)
    obs, reward, done, info = env.step("right")
    # -0.1 step + 1 box on target + 10 all boxes placed = 10.9
    assert (obs, done, info["success"]) == ("######\n#__@*#\n######\n", True, True)
    assert reward == pytest.approx(10.9)


def test_push_off_target_costs_one():
    env = loaded(["#######", "#@*_._#", "#__$__#", "#######"])
    obs, reward, done, info = env.step("right")
    assert obs == "#######\n#_+$._#\n#__$__#\n#######\n" and reward == pytest.approx(-1.1) and not done
    obs, reward, done, info = env.step("right")
    assert reward == pytest.approx(0.9) and not done  # onto the other target; the second box is still off


def test_blocked_moves_change_nothing_but_cost_a_step():
    env = loaded(["######", "#@$$.#", "#_._##", "######"])
    before = env.render()
    for action in ["up", "left", "right"]:  # wall, wall, box into box
        obs, reward, done, info = env.step(action)
        assert obs == before and reward == pytest.approx(-0.1) and not info["invalid"]
    env = loaded(["#####", "#_@$#", "#_._#", "#####"])
    assert env.step("right")[0] == "#####\n#_@$#\n#_._#\n#####\n"  # box into wall


@pytest.mark.parametrize("text", ["north", "", "u", "push up", "upp"])
def test_invalid_text_costs_penalty_and_changes_nothing(text):
    env = loaded(CORRIDOR)
    obs, reward, done, info = env.step(text)
    assert (obs, reward, done, info["invalid"]) == ("invalid\n", -0.2, False, True)
    assert env.render() == "######\n#@$_.#\n######\n"


@pytest.mark.parametrize("text", ["RIGHT", " right. ", "Right!"])
def test_move_parsing_is_lenient(text):
    env = loaded(CORRIDOR)
    assert env.step(text)[0] == "######\n#_@$.#\n######\n"


def test_solver_finds_shortest_plan_and_detects_deadlock():
    env = loaded(["######", "#_$_.#", "#@___#", "######"])
    # Walk up behind the box (1 move), push right twice.
    assert env.solution() == ["up", "right", "right"]
    env = loaded(["######", "#$__.#", "#@___#", "######"])  # box in a corner: unsolvable
    assert env.solution() is None and env.oracle_action() == "up"


def test_generated_rooms_are_walled_unsolved_and_within_length_bounds():
    cfg = SokobanConfig()
    env = Sokoban(cfg)
    lengths = []
    for seed in range(200):
        obs = env.reset(seed)
        rows = obs.splitlines()[1:]
        assert len(rows) == cfg.height and all(len(r) == cfg.width for r in rows)
        assert rows[0] == rows[-1] == "#" * cfg.width and all(r[0] == r[-1] == "#" for r in rows)
        assert len(env.boxes) == len(env.targets) == cfg.num_boxes and env.boxes != env.targets
        assert sum(r.count("@") + r.count("+") for r in rows) == 1
        plan = env.solution()
        assert plan is not None and cfg.min_solution_moves <= len(plan) <= cfg.max_solution_moves
        lengths.append(len(plan))
    assert len(set(lengths)) >= 5  # a spread of difficulties


def test_backward_search_distance_equals_forward_solver_length():
    env = Sokoban(SokobanConfig(num_boxes=2, width=7, height=7))
    for seed in range(15):
        env.reset(seed)
        layers = states_by_solution_length(env.floor, env.targets, 12)
        for distance, layer in enumerate(layers):
            for player, boxes in layer[:: max(1, len(layer) // 5)]:
                plan = solve(env.floor, player, boxes, env.targets)
                assert plan is not None and len(plan) == distance


def test_generation_is_deterministic_per_seed():
    a, b = Sokoban(), Sokoban()
    assert [a.reset(s) for s in range(30)] == [b.reset(s) for s in range(30)]
    assert len({a.reset(s) for s in range(30)}) > 25


@pytest.mark.parametrize(
    "cfg",
    [SokobanConfig(), SokobanConfig(width=8, height=8, num_boxes=2, max_solution_moves=14)],
    ids=["6x6x1", "8x8x2"],
)
def test_oracle_solves_generated_rooms_optimally_within_max_turns(cfg):
    env = Sokoban(cfg)
    for seed in range(60):
        env.reset(seed)
        optimal = len(env.solution())
        boxes_off = len(env.boxes - env.targets)
        episode_return, steps, done = 0.0, 0, False
        while not done:
            obs, reward, done, info = env.step(env.oracle_action())
            episode_return += reward
            steps += 1
        assert info["success"] and steps == optimal <= cfg.max_turns
        # Pushes on/off targets net out to the boxes that started off a target.
        assert episode_return == pytest.approx(-0.1 * steps + boxes_off + 10.0)


def test_oracle_replans_after_a_detour():
    env = loaded(["#######", "#_$__.#", "#@____#", "#######"])
    env.step("down")  # into the wall: no change
    env.step("right")  # off the plan
    while not env.done:
        obs, reward, done, info = env.step(env.oracle_action())
    assert info["success"]


def test_max_turns_override_caps_generated_solution_length():
    cfg = EnvConfig(name="sokoban", max_turns=4)
    env = Sokoban(cfg.env_config())
    for seed in range(50):
        env.reset(seed)
        assert len(env.solution()) <= 4


def test_load_room_rejects_malformed_rooms():
    env = Sokoban()
    with pytest.raises(ValueError, match="one player"):
        env.load_room(["#####", "#_$.#", "#####"])
    with pytest.raises(ValueError, match="2 boxes but 1 targets"):
        env.load_room(["######", "#@$$.#", "######"])


def test_random_policy_is_far_below_oracle():
    random_result = evaluate_policy(EnvConfig(name="sokoban"), "random", episodes=500, seed=0)
    assert 0.05 < random_result["success_rate"] < 0.4 and random_result["invalid_rate"] == 0.0
