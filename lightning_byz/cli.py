"""``lightning-byz`` (and ``python -m lightning_byz``): LightningCLI plus ``report`` and ``launch``.

    lightning-byz fit --config quickstart                       # a bundled recipe, by name
    lightning-byz fit --config my_recipe.yaml --print_config    # or any YAML file
    lightning-byz launch -n 4 -- fit --config quickstart        # 1 server + 4 MPI workers
    lightning-byz report --grid small                           # offline reproduction report

``fit|validate|test|predict`` are LightningCLI's; the model and data module are given by
``class_path`` (any LightningModule / LightningDataModule), the strategy by
``trainer.strategy.class_path: lightning_byz.AsyncPSStrategy`` and the faults as
``trainer.callbacks``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from lightning_byz.config import run_cli

EXTRA = ("report", "launch")
USAGE = "lightning-byz {fit,validate,test,predict,report,launch} ... (-h for help)"


def launch(args: Sequence[str]) -> int:
    """``launch [launcher options] -- SUBCOMMAND ...``: run this CLI as 1 server + N MPI workers."""
    args = list(args)
    if "--" not in args:
        print("usage: lightning-byz launch -n N [--timeout S] [--dry-run] -- fit --config recipe.yaml",
              file=sys.stderr)
        return 2
    split = args.index("--")
    from lightning_byz import launcher

    return launcher.main([*args[:split], "--", "-m", "lightning_byz", *args[split + 1:]])


def main(args: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["report"]:
        from lightning_byz import report

        return report.main(argv[1:])
    if argv[:1] == ["launch"]:
        return launch(argv[1:])
    if not argv:
        print(USAGE, file=sys.stderr)
        return 2
    cli = run_cli(argv)  # argv, not None: bundled recipe names resolve from the command line too
    trainer = cli.trainer
    if cli.subcommand == "fit" and trainer.is_global_zero:
        checkpoint = getattr(trainer.checkpoint_callback, "dirpath", None)
        print(f"logs: {trainer.log_dir}" + (f"\ncheckpoints: {checkpoint}" if checkpoint else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
