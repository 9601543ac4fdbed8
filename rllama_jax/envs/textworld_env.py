"""TextWorld games, generated offline by TextWorld's own generator, as a ``TextEnv``.

Games are made with ``textworld.generator`` from a difficulty preset and an integer seed, and
compiled once into a cache directory (``$RLLAMA_JAX_CACHE/textworld``, else
``~/.cache/rllama_jax/textworld``); the same preset and seed give byte-identical game files, so
a cache is only a speed-up. Each episode plays one game of a pool of seeds, picked with the env's
seeded RNG. Candidates are the game's admissible commands, sorted; the reward is the increase of
the game's score; an episode terminates when the game is won or lost.

The observation is cleaned as the RLlama seed's ``TextWorldAgent.format_observation`` does (the
text after the ASCII-art banner), and the interpreter's trailing prompt/status line
(``">   -= Kitchen =-0/3"``) is dropped.

Requires the ``textworld`` extra (``pip install rllama_jax[textworld]``).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import string
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gymnasium import spaces

try:
    import textworld
    import textworld.generator
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "TextWorld envs need the 'textworld' package: pip install 'rllama_jax[textworld]'"
    ) from error

from rllama_jax.envs.base import TextEnv, format_reward

TEXTWORLD_SYSTEM_PROMPT = (
    "You will be playing a text-based game. Here are some example commands: "
    "'go west', 'inventory', 'drop teacup', 'examine broom', 'open door', 'look'. "
    "Answer with one command, written as 'command: <your command>'."
)

MAX_TEXTWORLD_OBSERVATION_CHARS = 4096
"""Room descriptions run longer than the 1024 characters of the other envs."""


@dataclasses.dataclass(frozen=True)
class GamePreset:
    """Arguments of TextWorld's generator (as ``tw-make custom``): rooms, objects, quest length."""

    nb_rooms: int
    nb_objects: int
    quest_length: int


PRESETS = {
    "easy": GamePreset(nb_rooms=2, nb_objects=4, quest_length=2),
    "medium": GamePreset(nb_rooms=5, nb_objects=10, quest_length=4),
    "hard": GamePreset(nb_rooms=10, nb_objects=20, quest_length=8),
}

_BANNER_END = "$$$$$$$ \n\n"
_TRAILING_PROMPT = re.compile(r"\n>[^\n]*\s*$")
_ROOM_HEADER = re.compile(r"^-= (.+?) =-$")
_COMMAND = re.compile(r"command: (.+?)(?=\n|$)", re.IGNORECASE)


def clean_observation(feedback: str) -> str:
    """The seed's cleaning (text after the banner, stripped), minus the trailing prompt line."""
    text = feedback.split(_BANNER_END)[-1].strip()
    return _TRAILING_PROMPT.sub("", "\n" + text).strip()


def textworld_extract_action(response: str) -> str:
    """The seed's ``TextWorldAgent.extract_action``: the text after ``command:``, else "look"."""
    match = _COMMAND.search(response)
    return match.group(1) if match else "look"


def default_cache_dir() -> Path:
    """``$RLLAMA_JAX_CACHE/textworld``, else ``~/.cache/rllama_jax/textworld``."""
    root = os.environ.get("RLLAMA_JAX_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "rllama_jax"
    return base / "textworld"


def game_path(difficulty: str, seed: int, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the game of ``difficulty`` and ``seed`` is cached (a ``.z8`` with its ``.json``)."""
    preset = PRESETS[difficulty]
    name = (
        f"{difficulty}-r{preset.nb_rooms}-o{preset.nb_objects}-q{preset.quest_length}"
        f"-s{int(seed)}.z8"
    )
    return Path(cache_dir if cache_dir is not None else default_cache_dir()) / name


def make_game_file(difficulty: str, seed: int, cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the compiled game for ``difficulty`` and ``seed``, generating it if not cached.

    Generation writes into a private temporary directory and moves the files into place (the
    ``.json`` first, the ``.z8`` last), so concurrent envs never read a half-written game.
    """
    if difficulty not in PRESETS:
        raise ValueError(f"unknown difficulty {difficulty!r}; choose from {sorted(PRESETS)}")
    target = game_path(difficulty, seed, cache_dir)
    if target.exists() and target.with_suffix(".json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    preset = PRESETS[difficulty]
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=".generating-"))
    try:
        options = textworld.GameOptions()
        options.nb_rooms = preset.nb_rooms
        options.nb_objects = preset.nb_objects
        options.quest_length = preset.quest_length
        options.seeds = int(seed)
        options.path = str(scratch / target.name)
        options.force_recompile = True
        game = textworld.generator.make_game(options)
        compiled = Path(textworld.generator.compile_game(game, options))
        os.replace(compiled.with_suffix(".json"), target.with_suffix(".json"))
        os.replace(compiled, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def render_textworld_step(observation: str, action: str, reward: float) -> str:
    """``"[Kitchen] You see a stove. -> take apple -> +1"``: room (if named) and first line."""
    room, lines = None, []
    for line in observation.splitlines():
        line = " ".join(line.split())
        if not line:
            continue
        header = _ROOM_HEADER.match(line)
        if header and room is None:
            room = header.group(1)
        elif not header:
            lines.append(line)
    text = lines[0] if lines else ""
    if len(text) > 80:
        text = text[:77].rstrip() + "..."
    prefix = f"[{room}] " if room else ""
    return f"{prefix}{text} -> {action} -> {format_reward(reward)}"


class TextWorldEnv(TextEnv):
    """A pool of generated TextWorld games; each ``reset`` plays one of them from the start.

    Args:
      difficulty: a key of ``PRESETS`` ("easy", "medium", "hard").
      game_seeds: the generator seeds of the pool (default ``range(num_games)``).
      num_games: pool size when ``game_seeds`` is not given.
      game_file: play this compiled game (``.z8``/``.ulx`` with its ``.json``) instead of a pool.
      cache_dir: where generated games live (default ``default_cache_dir()``).
      max_steps: truncation limit per episode.
    """

    def __init__(
        self,
        difficulty: str = "easy",
        game_seeds: Sequence[int] | None = None,
        num_games: int = 10,
        game_file: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        max_steps: int | None = 50,
    ) -> None:
        super().__init__(max_steps=max_steps, num_actions=1)
        if difficulty not in PRESETS:
            raise ValueError(f"unknown difficulty {difficulty!r}; choose from {sorted(PRESETS)}")
        self.observation_space = spaces.Text(
            max_length=MAX_TEXTWORLD_OBSERVATION_CHARS, charset=string.printable
        )
        self.system_prompt = TEXTWORLD_SYSTEM_PROMPT
        self.difficulty = difficulty
        seeds = range(num_games) if game_seeds is None else game_seeds
        self.game_seeds = tuple(int(s) for s in seeds)
        if not self.game_seeds:
            raise ValueError("game_seeds must not be empty")
        self.game_file = None if game_file is None else Path(game_file)
        self.cache_dir = cache_dir
        self.request_infos = textworld.EnvInfos(
            admissible_commands=True,
            policy_commands=True,
            won=True,
            lost=True,
            score=True,
            max_score=True,
        )
        self._game: Any = None
        self._game_path: Path | None = None
        self._score = 0.0

    def _open(self, path: Path) -> None:
        if self._game_path != path:
            self.close()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._game = textworld.start(str(path), request_infos=self.request_infos)
            self._game_path = path

    def _info(self, state: Any) -> dict[str, Any]:
        return {
            "game_file": str(self._game_path),
            "score": state["score"],
            "max_score": state["max_score"],
            "won": bool(state["won"]),
            "lost": bool(state["lost"]),
            "policy_commands": list(state["policy_commands"] or []),
        }

    def _start(self, seed: int | None) -> tuple[str, dict[str, Any]]:
        if self.game_file is not None:
            path, game_seed = self.game_file, None
        else:
            game_seed = self.game_seeds[int(self.np_random.integers(len(self.game_seeds)))]
            path = make_game_file(self.difficulty, game_seed, self.cache_dir)
        self._open(path)
        with warnings.catch_warnings():  # jericho: "not fully supported"; TextWorld scores it
            warnings.simplefilter("ignore")
            state = self._game.reset()
        self._score = float(state["score"] or 0)
        self.candidates = sorted(state["admissible_commands"])
        return clean_observation(state.feedback), {**self._info(state), "game_seed": game_seed}

    def _transition(self, index: int) -> tuple[str, float, bool, dict[str, Any]]:
        state, score, done = self._game.step(self.candidates[index])
        reward = float(score) - self._score
        self._score = float(score)
        terminated = bool(done or state["won"] or state["lost"])
        if not terminated:
            self.candidates = sorted(state["admissible_commands"])
        return clean_observation(state.feedback), reward, terminated, self._info(state)

    def render_step(self, observation: str, action: str, reward: float) -> str:
        """One line for memory: ``[room] first line of the text -> action -> reward``."""
        return render_textworld_step(observation, action, reward)

    def close(self) -> None:
        if self._game is not None:
            self._game.close()
        self._game, self._game_path = None, None
