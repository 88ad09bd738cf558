"""Building the LightningCLI, and finding the bundled recipes by name.

The YAML recipes live in the repository's ``recipes/`` folder and are installed with the package as
``lightning_byz.recipes``, so ``--config quickstart`` works from a wheel as well as from a checkout.
Used by :mod:`lightning_byz.cli` and :mod:`lightning_byz.report` (which therefore do not import
each other).
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

import lightning_byz  # noqa: F401  (registers the "async_ps" strategy name)


def recipes_dir() -> Path:
    """The folder of the bundled ``*.yaml`` recipes."""
    return Path(str(resources.files("lightning_byz.recipes")))


def recipe_names() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def resolve_recipe(config: str) -> str:
    """``config`` itself when it is a file (or a path, or inline YAML); a bundled recipe's path when it
    is one's name (``quickstart``, ``mnist_ctma-offline``); else a ``FileNotFoundError`` that lists them."""
    if Path(config).exists() or "/" in config or "\\" in config or config.endswith((".yaml", ".yml")):
        return config
    if ":" in config or "\n" in config:  # inline YAML, e.g. --config '{trainer: {max_steps: 5}}'
        return config
    bundled = recipes_dir() / f"{config}.yaml"
    if bundled.is_file():
        return str(bundled)
    raise FileNotFoundError(f"no config file {config!r} and no bundled recipe of that name; recipes: {', '.join(recipe_names())}")


def with_recipes(args: Sequence[str]) -> list[str]:
    """``args`` with every ``--config NAME`` / ``--config=NAME`` of a bundled recipe made a path."""
    out = list(args)
    for i, arg in enumerate(out):
        if arg == "--config" and i + 1 < len(out):
            out[i + 1] = resolve_recipe(out[i + 1])
        elif arg.startswith("--config="):
            out[i] = "--config=" + resolve_recipe(arg.split("=", 1)[1])
    return out


def run_cli(args: Sequence[str] | None = None, run: bool = True) -> LightningCLI:
    """Build (and by default run) the LightningCLI over ``args`` (default: ``sys.argv``); seeds 0 unless
    configured; bundled recipes may be named instead of given by path."""
    return LightningCLI(
        args=None if args is None else with_recipes(args),
        run=run,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "lightning-byz"},
    )
