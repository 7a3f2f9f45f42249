"""FrozenLake as text: walk from S to G on a grid of ice without falling into a hole.

The grid is rendered one row per line, every cell one symbol (so each cell is one token):

    S  start     .  frozen ice     #  hole     G  goal     @  the agent (drawn over any cell)

    reset  -> "Reach G, avoid # holes. You are @.\\n@...\\n.#.#\\n...#\\n#..G\\n"   (classic 4x4 map)
    action -> "left" | "down" | "right" | "up"
    obs    -> the grid after the move ("@" moved), or "invalid\\n"

Rewards as in gymnasium's FrozenLake: 1 on reaching G (ends the episode, success), 0 otherwise;
stepping into a hole ends the episode with 0; moving off the grid leaves the agent in place.
Text that is not one of the four moves costs `invalid_reward` (-0.1) and does not move the agent.

`slippery=True` follows gymnasium: the intended move happens with probability 1/3 and each of the
two perpendicular moves with probability 1/3 (drawn from the episode's seeded generator).
`random_map_size=N` draws a fresh N×N map per seed (S top-left, G bottom-right, each other cell a
hole with probability `hole_prob`), redrawn until a path from S to G exists.

Oracle: on ice that does not slip, the first move of a BFS shortest path (ties: left, down, right,
up). On slippery ice, the move that maximises the probability of reaching G within the remaining
turns (finite-horizon dynamic programming over the map); no policy is certain to succeed there.
`success_probability()` returns that optimum from the current state.
"""
from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass

from fastarcher.envs.base import TurnBasedEnv, check_positive, normalize_action, unique_words

ACTIONS = ("left", "down", "right", "up")
"""Moves in gymnasium's order (0 left, 1 down, 2 right, 3 up)."""
MOVES = {0: (0, -1), 1: (1, 0), 2: (0, 1), 3: (-1, 0)}
"""Action index -> (row delta, column delta)."""

CLASSIC_4X4 = ("SFFF", "FHFH", "FFFH", "HFFG")
"""gymnasium's default map, in its S/F/H/G letters."""

_SYMBOL = {"S": "S", "F": ".", "H": "#", "G": "G"}
AGENT = "@"
PROMPT = "Reach G, avoid # holes. You are @.\n"

VOCAB_WORDS: tuple[str, ...] = unique_words([PROMPT, *_SYMBOL.values(), AGENT, *ACTIONS, "invalid\n", "row col"])
"""Words and symbols of frozenlake texts."""


@dataclass(kw_only=True)
class FrozenLakeConfig:
    """FrozenLake settings."""

    max_turns: int = 10
    """Moves per episode (invalid ones included); the classic map needs 6."""
    slippery: bool = False
    """Slip like gymnasium: intended move with probability 1/3, each perpendicular move 1/3."""
    map: str | None = None
    """A fixed map in gymnasium letters, rows separated by "/" (e.g. "SFF/FHF/FFG"; S top-left, one G);
    None: the classic 4x4 map (or random maps with random_map_size)."""
    show_position: bool = False
    """Also state the agent's cell after the grid ("row R col C", 0-based), so that a small model can
    read it from the last tokens instead of locating "@" in the grid."""
    random_map_size: int | None = None
    """None: the classic 4x4 map every episode; N: a fresh random N×N map per seed with a path to G."""
    hole_prob: float = 0.2
    """Probability that a cell of a random map (other than S and G) is a hole."""
    invalid_reward: float = -0.1
    """Reward for text that is not one of left/down/right/up."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field, value and rule when the config is unusable."""
        check_positive("env.frozenlake.max_turns", self.max_turns)
        size = self.random_map_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or not 2 <= size <= 32):
            raise ValueError(f"env.frozenlake.random_map_size ({size!r}) must be None or an integer in [2, 32]")
        if self.map is not None:
            if size is not None:
                raise ValueError("env.frozenlake.map and env.frozenlake.random_map_size are exclusive: set one")
            rows = self.map.split("/")
            if len(rows) < 2 or len({len(r) for r in rows}) != 1 or len(rows[0]) < 2:
                raise ValueError(f"env.frozenlake.map ({self.map!r}) must be at least 2 rows of equal length "
                                 "(at least 2), separated by '/'")
            letters = "".join(rows)
            if set(letters) - set("SFHG") or letters.count("S") != 1 or letters.count("G") != 1 or rows[0][0] != "S":
                raise ValueError(f"env.frozenlake.map ({self.map!r}) must use only S, F, H, G, with one S at the "
                                 "top-left and one G")
            if not _has_path(rows):
                raise ValueError(f"env.frozenlake.map ({self.map!r}) has no path from S to G")
        if not 0.0 <= self.hole_prob <= 0.8:
            raise ValueError(f"env.frozenlake.hole_prob ({self.hole_prob!r}) must be in [0, 0.8]")


def _has_path(grid: list[str]) -> bool:
    return _bfs_first_moves(grid, (0, 0))[0] is not None


def random_map(size: int, hole_prob: float, rng: random.Random) -> tuple[str, ...]:
    """An N×N map in S/F/H/G letters with S top-left, G bottom-right and a path between them."""
    for _ in range(100):
        rows = [
            "".join("H" if rng.random() < hole_prob else "F" for _ in range(size)) for _ in range(size)
        ]
        rows[0] = "S" + rows[0][1:]
        rows[-1] = rows[-1][:-1] + "G"
        if _has_path(rows):
            return tuple(rows)
    # Dense holes rarely leave a path: clear a random monotone (down/right) one.
    grid = [list(row) for row in rows]
    r = c = 0
    while (r, c) != (size - 1, size - 1):
        if c == size - 1 or (r < size - 1 and rng.random() < 0.5):
            r += 1
        else:
            c += 1
        if grid[r][c] == "H":
            grid[r][c] = "F"
    return tuple("".join(row) for row in grid)


def _neighbor(grid: list[str] | tuple[str, ...], pos: tuple[int, int], action: int) -> tuple[int, int]:
    """Where `action` leads from `pos`; off-grid moves stay in place."""
    dr, dc = MOVES[action]
    r, c = pos[0] + dr, pos[1] + dc
    if 0 <= r < len(grid) and 0 <= c < len(grid[0]):
        return r, c
    return pos


def _bfs_first_moves(grid, start: tuple[int, int]) -> tuple[int | None, int]:
    """(first action of a shortest path from `start` to G or None, its length); holes are walls."""
    if grid[start[0]][start[1]] == "G":
        return None, 0
    parent: dict[tuple[int, int], tuple[tuple[int, int], int] | None] = {start: None}
    queue = deque([start])
    while queue:
        pos = queue.popleft()
        for action in range(4):
            nxt = _neighbor(grid, pos, action)
            if nxt in parent or grid[nxt[0]][nxt[1]] == "H":
                continue
            parent[nxt] = (pos, action)
            if grid[nxt[0]][nxt[1]] == "G":
                length, node = 0, nxt
                first = action
                while parent[node] is not None:
                    node, first = parent[node]
                    length += 1
                return first, length
            queue.append(nxt)
    return None, 0


class FrozenLake(TurnBasedEnv):
    """Walk on a text grid from S to G avoiding holes; optional slippery ice."""

    name = "frozenlake"

    def __init__(self, cfg: FrozenLakeConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else FrozenLakeConfig()
        self.cfg.validate()
        self.max_turns = self.cfg.max_turns
        self.invalid_reward = self.cfg.invalid_reward
        self.grid: tuple[str, ...] = CLASSIC_4X4
        self.pos = (0, 0)
        self._dp_cache: tuple[tuple[str, ...], list[list[float]]] | None = None

    def action_choices(self) -> list[str]:
        return list(ACTIONS)

    def observation_texts(self) -> list[str]:
        # A render has one symbol per cell whatever the map holds. The agent along the last row and
        # column covers every number of the position line; a few random maps cover subword tokenizers'
        # merges of symbols.
        saved = (self.grid, self.pos)
        self._reset(random.Random(0))
        height, width = len(self.grid), len(self.grid[0])
        cells = [(r, width - 1) for r in range(height)] + [(height - 1, c) for c in range(width)]
        texts = [self.invalid_obs]
        for pos in cells:
            self.pos = pos
            texts.append(self.render())
        for seed in range(1, 4 if self.cfg.random_map_size else 1):
            self._reset(random.Random(seed))
            texts.append(self.render())
        self.grid, self.pos = saved
        return texts

    def render(self) -> str:
        """The grid as text rows with the agent drawn as "@"; every row ends with "\\n"."""
        lines = []
        for r, row in enumerate(self.grid):
            cells = [_SYMBOL[cell] for cell in row]
            if r == self.pos[0]:
                cells[self.pos[1]] = AGENT
            lines.append("".join(cells) + "\n")
        if self.cfg.show_position:
            lines.append(f"row {self.pos[0]} col {self.pos[1]}\n")
        return "".join(lines)

    def oracle_action(self) -> str:
        if not self.cfg.slippery:
            first, _ = _bfs_first_moves(self.grid, self.pos)
            return ACTIONS[first if first is not None else 0]
        values = self._reach_probabilities()
        turns_left = max(self.max_turns - self._turn, 1)
        best, best_value = 0, -1.0
        for action in range(4):
            value = self._slip_value(values[turns_left - 1], self.pos, action)
            if value > best_value + 1e-12:
                best, best_value = action, value
        return ACTIONS[best]

    def success_probability(self) -> float:
        """Best probability of reaching G from here in the remaining turns (slippery dynamics if set)."""
        if not self.cfg.slippery:
            first, length = _bfs_first_moves(self.grid, self.pos)
            reachable = first is not None or self._cell(self.pos) == "G"
            return float(reachable and length <= self.max_turns - self._turn)
        width = len(self.grid[0])
        return self._reach_probabilities()[self.max_turns - self._turn][self.pos[0] * width + self.pos[1]]

    def _cell(self, pos: tuple[int, int]) -> str:
        return self.grid[pos[0]][pos[1]]

    def _slip_value(self, values: list[float], pos: tuple[int, int], action: int) -> float:
        """Expected next-state value of `action` under slipping (intended and both perpendiculars)."""
        width = len(self.grid[0])
        total = 0.0
        for actual in ((action - 1) % 4, action, (action + 1) % 4):
            r, c = _neighbor(self.grid, pos, actual)
            total += values[r * width + c]
        return total / 3.0

    def _reach_probabilities(self) -> list[list[float]]:
        """values[t][cell]: best probability of reaching G within t moves, for t = 0..max_turns."""
        if self._dp_cache is not None and self._dp_cache[0] == self.grid:
            return self._dp_cache[1]
        height, width = len(self.grid), len(self.grid[0])
        cells = [(r, c) for r in range(height) for c in range(width)]
        current = [1.0 if self._cell(p) == "G" else 0.0 for p in cells]
        table = [current]
        for _ in range(self.max_turns):
            nxt = []
            for pos in cells:
                kind = self._cell(pos)
                if kind in "GH":
                    nxt.append(1.0 if kind == "G" else 0.0)
                else:
                    nxt.append(max(self._slip_value(current, pos, a) for a in range(4)))
            table.append(nxt)
            current = nxt
        self._dp_cache = (self.grid, table)
        return table

    def _reset(self, rng: random.Random) -> str:
        if self.cfg.map is not None:
            self.grid = tuple(self.cfg.map.split("/"))
        elif self.cfg.random_map_size is None:
            self.grid = CLASSIC_4X4
        else:
            self.grid = random_map(self.cfg.random_map_size, self.cfg.hole_prob, rng)
        self.pos = (0, 0)
        return PROMPT + self.render()

    def _parse(self, action_text: str) -> str | None:
        text = normalize_action(action_text)
        return text if text in ACTIONS else None

    def _apply(self, action: str) -> tuple[str, float, bool, bool]:
        intended = ACTIONS.index(action)
        actual = intended
        if self.cfg.slippery:
            actual = (intended + self._rng.choice((-1, 0, 1))) % 4
        self.pos = _neighbor(self.grid, self.pos, actual)
        kind = self._cell(self.pos)
        if kind == "G":
            return self.render(), 1.0, True, True
        return self.render(), 0.0, kind == "H", False
