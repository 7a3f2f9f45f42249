"""Sokoban as text: push every box onto a target in a small generated room.

Rooms are rendered one row per line in the standard XSB symbols, with "_" for empty floor so that
every cell is one visible symbol (and one token):

    #  wall     _  floor     .  target     $  box     *  box on a target     @  player     +  player on a target

    reset  -> "Push every $ onto a . target. You are @.\\n######\\n#_.__#\\n..." (the room)
    action -> "up" | "down" | "left" | "right"
    obs    -> the room after the move, or "invalid\\n"

Rewards follow gym-sokoban (and RAGEN): -0.1 per step, +1 for pushing a box onto a target, -1 for
pushing one off a target, +10 when every box is on a target (which ends the episode, success).
Walking into a wall or pushing a box into a wall or another box is a valid step that changes
nothing. Text that is not a move costs `invalid_reward` (-0.2: the step cost plus a 0.1 format
penalty) and changes nothing.

Generation (seeded): carve a random-walk room inside the outer wall and put the boxes on random
targets; then play backwards from every solved state (boxes on targets, player on any free cell):
a backward move steps the player to a free neighbour and may pull the box behind it along, the
exact reverse of a forward move or push. Breadth-first search over these backward moves gives
every state together with the length of its shortest solution; the room starts from a state drawn
by first drawing a length uniformly among those available in [min_solution_moves,
min(max_solution_moves, max_turns)], then a state of that length uniformly. So every room is
solvable, within max_turns, and the difficulty is set by the two bounds.

Oracle: breadth-first search over (player, boxes) states gives a shortest move sequence; its first
move is the oracle action (the plan is cached and replanned when the agent leaves it). From a
deadlocked state (no solution) the oracle answers "up".
"""
from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass

from fastarcher.envs.base import TurnBasedEnv, check_positive, normalize_action, unique_words

ACTIONS = ("up", "down", "left", "right")
"""Moves in gym-sokoban's order."""
DELTAS = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}

WALL, FLOOR, TARGET, BOX, BOX_ON_TARGET, PLAYER, PLAYER_ON_TARGET = "#", "_", ".", "$", "*", "@", "+"
PROMPT = "Push every $ onto a . target. You are @.\n"

VOCAB_WORDS: tuple[str, ...] = unique_words(
    [PROMPT, WALL, FLOOR, TARGET, BOX, BOX_ON_TARGET, PLAYER, PLAYER_ON_TARGET, *ACTIONS, "invalid\n"]
)
"""Words and symbols of sokoban texts."""

STEP_REWARD = -0.1
"""Reward of every valid move (gym-sokoban's penalty_for_step)."""
BOX_ON_TARGET_REWARD = 1.0
"""Added per box pushed onto a target; the same amount is subtracted per box pushed off one."""
SOLVED_REWARD = 10.0
"""Added on the move that puts the last box on a target."""

_MAX_SOLVER_STATES = 200_000
"""The BFS solver gives up (no plan) beyond this many visited states."""
_MAX_GENERATION_TRIES = 1000


@dataclass(kw_only=True)
class SokobanConfig:
    """Sokoban settings."""

    width: int = 6
    """Room width in cells, outer walls included (>= 5)."""
    height: int = 6
    """Room height in cells, outer walls included (>= 5)."""
    num_boxes: int = 1
    """Boxes (and targets) per room."""
    max_turns: int = 20
    """Moves per episode (invalid ones included); generated rooms are solvable within it."""
    min_solution_moves: int = 2
    """Shortest solution of a generated room takes at least this many moves."""
    max_solution_moves: int = 10
    """Shortest solution of a generated room takes at most this many moves (and at most max_turns)."""
    invalid_reward: float = -0.2
    """Reward for text that is not one of up/down/left/right."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field, value and rule when the config is unusable."""
        for field in ("width", "height"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or not 5 <= value <= 16:
                raise ValueError(f"env.sokoban.{field} ({value!r}) must be an integer in [5, 16]")
        check_positive("env.sokoban.num_boxes", self.num_boxes)
        limit = max(1, (self.width - 2) * (self.height - 2) // 6)
        if self.num_boxes > limit:
            raise ValueError(
                f"env.sokoban.num_boxes ({self.num_boxes}) must be at most {limit} for a "
                f"{self.width}x{self.height} room (interior cells // 6)"
            )
        check_positive("env.sokoban.max_turns", self.max_turns)
        check_positive("env.sokoban.min_solution_moves", self.min_solution_moves)
        if self.max_solution_moves < self.min_solution_moves:
            raise ValueError(
                f"env.sokoban.max_solution_moves ({self.max_solution_moves}) must be >= "
                f"env.sokoban.min_solution_moves ({self.min_solution_moves})"
            )
        if self.max_turns < self.min_solution_moves:
            raise ValueError(
                f"env.sokoban.max_turns ({self.max_turns}) must be >= "
                f"env.sokoban.min_solution_moves ({self.min_solution_moves}) so rooms stay solvable in time"
            )


Pos = tuple[int, int]
State = tuple[Pos, frozenset]


def _add(pos: Pos, delta: Pos) -> Pos:
    return pos[0] + delta[0], pos[1] + delta[1]


def solve(floor: frozenset, player: Pos, boxes: frozenset, targets: frozenset) -> list[str] | None:
    """A shortest move sequence that puts every box on a target, or None (deadlock / too large)."""
    start: State = (player, boxes)
    if boxes == targets:
        return []
    parent: dict[State, tuple[State, str] | None] = {start: None}
    queue = deque([start])
    while queue:
        state = queue.popleft()
        for action in ACTIONS:
            nxt = _forward(floor, state, action)
            if nxt is None or nxt in parent:
                continue
            parent[nxt] = (state, action)
            if nxt[1] == targets:
                plan = []
                while parent[nxt] is not None:
                    nxt, move = parent[nxt]
                    plan.append(move)
                return plan[::-1]
            if len(parent) > _MAX_SOLVER_STATES:
                return None
            queue.append(nxt)
    return None


def _forward(floor: frozenset, state: State, action: str) -> State | None:
    """The state after a forward move, or None when the move changes nothing."""
    player, boxes = state
    delta = DELTAS[action]
    nxt = _add(player, delta)
    if nxt not in floor:
        return None
    if nxt in boxes:
        beyond = _add(nxt, delta)
        if beyond not in floor or beyond in boxes:
            return None
        return nxt, (boxes - {nxt}) | {beyond}
    return nxt, boxes


def _carve_room(width: int, height: int, rng: random.Random) -> set[Pos]:
    """Floor cells of a room: a random walk over the interior covering about 70 % of it."""
    interior = [(r, c) for r in range(1, height - 1) for c in range(1, width - 1)]
    goal = max(4, round(0.7 * len(interior)))
    pos = rng.choice(interior)
    floor = {pos}
    delta = rng.choice(list(DELTAS.values()))
    while len(floor) < goal:
        if rng.random() < 0.35:
            delta = rng.choice(list(DELTAS.values()))
        nxt = _add(pos, delta)
        if 1 <= nxt[0] < height - 1 and 1 <= nxt[1] < width - 1:
            pos = nxt
            floor.add(pos)
    return floor


def _backward_moves(floor: frozenset, state: State):
    """States one backward move before `state`: the player steps to a free neighbour and may pull
    the box behind it along. Each is the reverse of a legal forward move into `state`."""
    player, boxes = state
    for delta in DELTAS.values():
        nxt = _add(player, delta)
        if nxt not in floor or nxt in boxes:
            continue
        yield nxt, boxes
        behind = (player[0] - delta[0], player[1] - delta[1])
        if behind in boxes:
            yield nxt, (boxes - {behind}) | {player}


def states_by_solution_length(floor: frozenset, targets: frozenset, max_moves: int) -> list[list[State]]:
    """layers[d]: every state whose shortest solution takes exactly d moves, for d <= max_moves.

    Breadth-first search backwards from all solved states (boxes on the targets, player on any free
    floor cell); discovery order is deterministic (sorted cells, fixed move order).
    """
    layer = [(cell, targets) for cell in sorted(floor) if cell not in targets]
    seen = set(layer)
    layers = [layer]
    for _ in range(max_moves):
        nxt_layer = []
        for state in layer:
            for prev in _backward_moves(floor, state):
                if prev not in seen:
                    seen.add(prev)
                    nxt_layer.append(prev)
        if not nxt_layer:
            break
        layers.append(nxt_layer)
        layer = nxt_layer
    return layers


def generate_room(cfg: SokobanConfig, rng: random.Random) -> tuple[frozenset, frozenset, Pos, frozenset]:
    """(floor, targets, player, boxes) of a room whose shortest solution takes between
    min_solution_moves and min(max_solution_moves, max_turns) moves; deterministic given rng."""
    longest = min(cfg.max_solution_moves, cfg.max_turns)
    for _ in range(_MAX_GENERATION_TRIES):  # a carved room almost always works; else draw again
        floor = frozenset(_carve_room(cfg.width, cfg.height, rng))
        cells = sorted(floor)
        if len(cells) < cfg.num_boxes + 2:
            continue
        targets = frozenset(rng.sample(cells, cfg.num_boxes))
        layers = states_by_solution_length(floor, targets, longest)
        lengths = [d for d in range(cfg.min_solution_moves, len(layers)) if layers[d]]
        if lengths:
            player, boxes = rng.choice(layers[rng.choice(lengths)])
            return floor, targets, player, boxes
    raise RuntimeError(
        f"no {cfg.width}x{cfg.height} room with {cfg.num_boxes} boxes and a solution of at least "
        f"{cfg.min_solution_moves} moves found in {_MAX_GENERATION_TRIES} tries; lower "
        f"env.sokoban.min_solution_moves ({cfg.min_solution_moves})"
    )


class Sokoban(TurnBasedEnv):
    """Push boxes onto targets in a small generated room rendered as text."""

    name = "sokoban"

    def __init__(self, cfg: SokobanConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else SokobanConfig()
        self.cfg.validate()
        self.max_turns = self.cfg.max_turns
        self.invalid_reward = self.cfg.invalid_reward
        self.floor: frozenset = frozenset()
        self.targets: frozenset = frozenset()
        self.player: Pos = (1, 1)
        self.boxes: frozenset = frozenset()
        self.height, self.width = self.cfg.height, self.cfg.width
        self._plan: dict[State, str] = {}

    def action_choices(self) -> list[str]:
        return list(ACTIONS)

    def observation_texts(self) -> list[str]:
        # Every render is the whole room, one symbol per cell: rooms of a few seeds cover the sizes
        # (and, for subword tokenizers, a range of symbol runs).
        saved = (self.floor, self.targets, self.player, self.boxes, self._plan)
        texts = [self.invalid_obs]
        for seed in range(4):
            self._reset(random.Random(seed))
            texts.append(self.render())
        self.floor, self.targets, self.player, self.boxes, self._plan = saved
        return texts

    def render(self) -> str:
        """The room as text rows (legend in the module docstring); every row ends with "\\n"."""
        lines = []
        for r in range(self.height):
            row = []
            for c in range(self.width):
                pos = (r, c)
                on_target = pos in self.targets
                if pos not in self.floor:
                    row.append(WALL)
                elif pos in self.boxes:
                    row.append(BOX_ON_TARGET if on_target else BOX)
                elif pos == self.player:
                    row.append(PLAYER_ON_TARGET if on_target else PLAYER)
                else:
                    row.append(TARGET if on_target else FLOOR)
            lines.append("".join(row) + "\n")
        return "".join(lines)

    def load_room(self, rows: list[str]) -> None:
        """Replace the current room by one drawn in the render legend (a custom level or a test)."""
        legend = {WALL, FLOOR, TARGET, BOX, BOX_ON_TARGET, PLAYER, PLAYER_ON_TARGET}
        cells = {(r, c): ch for r, row in enumerate(rows) for c, ch in enumerate(row)}
        unknown = set(cells.values()) - legend
        players = [pos for pos, ch in cells.items() if ch in (PLAYER, PLAYER_ON_TARGET)]
        if unknown or len(players) != 1 or len({len(row) for row in rows}) != 1:
            raise ValueError(f"room needs equal-length rows of {''.join(sorted(legend))} and one player: {rows}")
        self.floor = frozenset(pos for pos, ch in cells.items() if ch != WALL)
        self.targets = frozenset(pos for pos, ch in cells.items() if ch in (TARGET, BOX_ON_TARGET, PLAYER_ON_TARGET))
        self.boxes = frozenset(pos for pos, ch in cells.items() if ch in (BOX, BOX_ON_TARGET))
        if len(self.boxes) != len(self.targets):
            raise ValueError(f"room has {len(self.boxes)} boxes but {len(self.targets)} targets: {rows}")
        self.player = players[0]
        self.height, self.width = len(rows), len(rows[0])
        self._plan = {}

    def solution(self) -> list[str] | None:
        """A shortest move sequence from the current state, or None when there is none."""
        return solve(self.floor, self.player, self.boxes, self.targets)

    def oracle_action(self) -> str:
        state = (self.player, self.boxes)
        if state not in self._plan:
            self._plan = {}
            plan = self.solution()
            if not plan:
                return ACTIONS[0]
            for move in plan:
                self._plan[state] = move
                state = _forward(self.floor, state, move)
            state = (self.player, self.boxes)
        return self._plan[state]

    def _reset(self, rng: random.Random) -> str:
        self.floor, self.targets, self.player, self.boxes = generate_room(self.cfg, rng)
        self.height, self.width = self.cfg.height, self.cfg.width
        self._plan = {}
        return PROMPT + self.render()

    def _parse(self, action_text: str) -> str | None:
        text = normalize_action(action_text)
        return text if text in ACTIONS else None

    def _apply(self, action: str) -> tuple[str, float, bool, bool]:
        reward = STEP_REWARD
        nxt = _forward(self.floor, (self.player, self.boxes), action)
        if nxt is not None:
            on_before = len(self.boxes & self.targets)
            self.player, self.boxes = nxt
            # +1 per box pushed onto a target, -1 per box pushed off one.
            reward += BOX_ON_TARGET_REWARD * (len(self.boxes & self.targets) - on_before)
        solved = self.boxes == self.targets
        if solved:
            reward += SOLVED_REWARD
        return self.render(), reward, solved, solved
