"""FrozenLake rules (fastarcher/envs/frozenlake.py), checked against gymnasium's FrozenLake semantics."""
import random
from collections import Counter

import pytest
import torch

from fastarcher.envs import EnvConfig, FrozenLake, FrozenLakeConfig
from fastarcher.envs.evaluate import evaluate_policy
from fastarcher.envs.frozenlake import random_map

torch.manual_seed(0)

CLASSIC_START = "Reach G, avoid # holes. You are @.\n@...\n.#.#\n...#\n#..G\n"


def test_reset_renders_classic_map_with_agent_on_start():
    assert FrozenLake().reset(0) == CLASSIC_START
    assert FrozenLake().action_choices() == ["left", "down", "right", "up"]


def test_moves_redraw_agent_and_walls_keep_it_in_place():
    env = FrozenLake()
    env.reset(0)
    assert env.step("right") == ("S@..\n.#.#\n...#\n#..G\n", 0.0, False,
                                 {"invalid": False, "success": False, "truncated": False, "turn": 1})
    assert env.step("up")[0] == "S@..\n.#.#\n...#\n#..G\n"  # off the grid: stays
    assert env.step("left")[0] == "@...\n.#.#\n...#\n#..G\n"  # back on S


def test_hole_ends_episode_without_reward():
    env = FrozenLake()
    env.reset(0)
    env.step("right")
    obs, reward, done, info = env.step("down")
    assert (obs, reward, done, info["success"], info["truncated"]) == ("S...\n.@.#\n...#\n#..G\n", 0.0, True, False, False)


def test_goal_gives_one_and_success():
    env = FrozenLake()
    env.reset(0)
    rewards = [env.step(a)[1] for a in ["down", "down", "right", "right", "down"]]
    obs, reward, done, info = env.step("right")
    assert rewards == [0.0] * 5 and (reward, done, info["success"]) == (1.0, True, True)
    assert obs == "S...\n.#.#\n...#\n#..@\n"


@pytest.mark.parametrize("text", ["jump", "", "l", "north", "left right"])
def test_invalid_move_costs_penalty_and_does_not_move(text):
    env = FrozenLake()
    env.reset(0)
    env.step("down")
    obs, reward, done, info = env.step(text)
    assert (obs, reward, done, info["invalid"]) == ("invalid\n", -0.1, False, True)
    assert env.pos == (1, 0)


@pytest.mark.parametrize("text", ["Down", " DOWN ", "down.", "down!"])
def test_move_parsing_is_lenient(text):
    env = FrozenLake()
    env.reset(0)
    assert env.step(text)[0] == "S...\n@#.#\n...#\n#..G\n"


def test_episode_truncates_at_max_turns():
    env = FrozenLake(FrozenLakeConfig(max_turns=4))
    env.reset(0)
    results = [env.step("left") for _ in range(4)]
    assert [r[2] for r in results] == [False, False, False, True] and results[-1][3]["truncated"]


def test_slippery_moves_intended_and_each_perpendicular_a_third_of_the_time():
    env = FrozenLake(FrozenLakeConfig(slippery=True))
    counts = Counter()
    trials = 3000
    for seed in range(trials):
        env.reset(seed)
        env.grid = ("SFFFF", "FFFFF", "FFFFF", "FFFFF", "FFFFG")  # open ice (S/F/H/G letters), agent in the middle
        env.pos = (2, 2)
        env.step("up")
        counts[env.pos] += 1
    # up -> (1,2); perpendicular left -> (2,1), right -> (2,3); never down.
    assert set(counts) == {(1, 2), (2, 1), (2, 3)}
    for pos in counts:
        assert abs(counts[pos] / trials - 1 / 3) < 0.035, counts


def test_slippery_episode_is_deterministic_per_seed():
    def run(seed):
        env = FrozenLake(FrozenLakeConfig(slippery=True, max_turns=20))
        env.reset(seed)
        return [env.step(a)[0] for a in ["right", "down", "right", "down"] if not env.done]

    assert run(3) == run(3)
    assert len({tuple(run(s)) for s in range(10)}) > 1


def test_oracle_walks_a_shortest_path_on_classic_map():
    env = FrozenLake()
    env.reset(0)
    actions = []
    while not env.done:
        actions.append(env.oracle_action())
        obs, reward, done, info = env.step(actions[-1])
    assert info["success"] and len(actions) == 6  # Manhattan distance 3 + 3, no detour needed


def test_random_maps_are_seeded_have_start_goal_and_a_path():
    size = 6
    cfg = FrozenLakeConfig(random_map_size=size, max_turns=2 * size * size)
    env = FrozenLake(cfg)
    maps, holes = set(), 0
    for seed in range(150):
        env.reset(seed)
        grid = env.grid
        assert len(grid) == size and all(len(row) == size for row in grid)
        assert grid[0][0] == "S" and grid[-1][-1] == "G"
        holes += sum(row.count("H") for row in grid)
        maps.add(grid)
        while not env.done:  # BFS oracle reaches G, so a path exists
            obs, reward, done, info = env.step(env.oracle_action())
        assert info["success"], grid
    env.reset(11)
    first = env.grid
    env.reset(11)
    assert env.grid == first and len(maps) > 140
    assert abs(holes / (150 * (size * size - 2)) - cfg.hole_prob) < 0.04  # rejection of pathless maps lowers it slightly


def test_random_map_dense_holes_still_has_a_path():
    for seed in range(20):
        grid = random_map(8, 0.8, random.Random(seed))
        env = FrozenLake(FrozenLakeConfig(random_map_size=8, max_turns=200))
        env.reset(0)
        env.grid, env.pos = grid, (0, 0)
        while not env.done:
            obs, reward, done, info = env.step(env.oracle_action())
        assert info["success"]


def test_slippery_oracle_success_matches_its_dynamic_programming_value():
    cfg = EnvConfig(name="frozenlake", max_turns=100, frozenlake=FrozenLakeConfig(slippery=True))
    env = FrozenLake(cfg.env_config())
    env.reset(0)
    predicted = env.success_probability()  # optimal success probability from S with 100 moves
    assert 0.7 < predicted < 0.8  # gymnasium's 4x4 slippery map: optimal success about 0.74
    result = evaluate_policy(cfg, "oracle", episodes=1000, seed=0)
    assert abs(result["success_rate"] - predicted) < 0.045  # 3 standard errors


def test_success_probability_on_hand_checked_states():
    env = FrozenLake(FrozenLakeConfig(max_turns=10))
    env.reset(0)
    assert env.success_probability() == 1.0  # 6 moves needed, 10 left
    env = FrozenLake(FrozenLakeConfig(max_turns=5))
    env.reset(0)
    assert env.success_probability() == 0.0
    env = FrozenLake(FrozenLakeConfig(slippery=True, max_turns=1))
    env.reset(0)
    env.pos = (3, 2)  # left of G: "right" reaches G with 1/3; "down" (slips right 1/3) the same; nothing better
    assert env.success_probability() == pytest.approx(1 / 3)
    env.pos = (2, 2)  # above the cell left of G, one move: G is two cells away
    assert env.success_probability() == 0.0


def test_random_policy_rarely_succeeds_on_classic_map():
    result = evaluate_policy(EnvConfig(name="frozenlake"), "random", episodes=1000, seed=0)
    assert result["success_rate"] < 0.05 and result["invalid_rate"] == 0.0


def test_custom_map_is_used_and_solvable_by_the_oracle():
    env = FrozenLake(FrozenLakeConfig(map="SFF/FHF/FFG", max_turns=8))
    prompt = env.reset(0)
    assert prompt.endswith("@..\n.#.\n..G\n")
    done, steps, reward = False, 0, 0.0
    while not done:
        _, reward, done, info = env.step(env.oracle_action())
        steps += 1
    assert info["success"] and reward == 1.0 and steps == 4


@pytest.mark.parametrize("bad", ["SFF", "SFF/FH", "SFX/FFG", "FSF/FFG", "SHF/HFG", "SFF/FFF"])
def test_custom_map_validation_names_the_field(bad):
    with pytest.raises(ValueError, match="env.frozenlake.map"):
        FrozenLakeConfig(map=bad)


def test_show_position_states_the_agent_cell_after_the_grid():
    env = FrozenLake(FrozenLakeConfig(map="SFF/FHF/FFG", show_position=True))
    assert env.reset(0).endswith("@..\n.#.\n..G\nrow 0 col 0\n")
    obs, _, _, _ = env.step("right")
    assert obs == "S@.\n.#.\n..G\nrow 0 col 1\n"
