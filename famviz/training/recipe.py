"""Training recipes as files: ``famviz train --recipe FILE.toml``.

A recipe is a flat TOML table of ``TrainConfig`` settings, named as in ``train_config.json``
(``lr = 1e-4``, ``passkey_tokens = "260-4096"``; dashes work too, as on the command line). Options given
on the command line override it. A run records the recipe as it ran (every setting, defaults included)
in its training card and as ``recipe.toml`` in its directory, so ``famviz train --recipe
RUN/recipe.toml --out NEW`` repeats it. The shipped adapters' recipes are in ``assets/recipes/``.
"""

from __future__ import annotations

import difflib
import json
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

from famviz.errors import ConfigError

if TYPE_CHECKING:
    from famviz.training.config import TrainConfig

RECIPE_FILE = "recipe.toml"
# Which run this is, not how it trains: chosen per run (--out, --resume) or written by famviz.
NOT_IN_RECIPES = ("out", "command", "stage_command")
_KINDS = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def _setting_kinds() -> dict[str, str]:
    """TrainConfig's settings and the base type of each ("int", "float", "str", "bool" or "list")."""
    from famviz.training.config import TrainConfig

    kinds = {}
    for field in fields(TrainConfig):
        if field.name in NOT_IN_RECIPES:
            continue
        text = str(field.type)
        kinds[field.name] = "list" if "list" in text else next(k for k in ("bool", "int", "float", "str") if k in text)
    return kinds


def read_recipe(path: str | Path) -> dict:
    """The settings of a recipe file, checked: known names, the right types. ConfigError otherwise."""
    path = Path(path)
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"recipe {path} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the recipe {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"recipe {path} is not valid TOML: {exc}") from None
    kinds = _setting_kinds()
    settings = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name in NOT_IN_RECIPES:
            raise ConfigError(f"recipe {path}: {key!r} is chosen per run, not in a recipe (use --{key})")
        if name not in kinds:
            near = difflib.get_close_matches(name, kinds, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(f"recipe {path}: unknown setting {key!r}{hint}")
        kind = kinds[name]
        if kind == "list":
            value = [value] if isinstance(value, str) else value
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        else:  # bool is an int in Python: only a real bool is a bool, and never a number
            ok = isinstance(value, _KINDS[kind]) and (isinstance(value, bool) == (kind == "bool"))
        if not ok:
            raise ConfigError(
                f"recipe {path}: {key} must be {'a list of paths' if kind == 'list' else kind}, got {value!r}"
            )
        settings[name] = float(value) if kind == "float" else value
    return settings


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a TOML basic string


def recipe_text(config: TrainConfig, comment: str = "") -> str:
    """The run's settings as a recipe file (those left unset, None, are omitted: they mean the default)."""
    lines = [f"# {line}" for line in comment.splitlines()] if comment else []
    for name in _setting_kinds():
        value = getattr(config, name)
        if value is not None:
            lines.append(f"{name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"
