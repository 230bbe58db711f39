"""``mmadapters train <recipe> --config FILE.yaml``: train any registered recipe with the shared engine.

Torch-free at import (``mmadapters --help`` builds this parser); the recipe and the engine are imported
when the command runs. Errors name where a bad value came from (the YAML file, ``--set KEY=VALUE``, ``--device``);
the run folder is locked from before ``config.yaml`` is written until the run ends, so a second run into it (or a
``--resume`` of a run that is still alive) is refused. Under torchrun every rank runs the command; rank 0 holds
the lock and writes the files::

    torchrun --nproc_per_node 2 --no-python mmadapters train tip-adapter --config configs/tip-adapter.yaml
"""

from __future__ import annotations

import argparse
import sys

# name -> "module:attribute" of a mmadapters.training.recipe.Recipe (imported lazily)
RECIPES: dict[str, str] = {
    "tip-adapter": "mmadapters.vision.fewshot_train:TIP_RECIPE",
    "caps-adapter": "mmadapters.vision.fewshot_train:CAPS_RECIPE",
    "vl-adapter": "mmadapters.vision.vl_train:RECIPE",
    "tem-adapter": "mmadapters.video.tem_train:RECIPE",
    "fineclipper": "mmadapters.video.fineclipper_train:RECIPE",
    "lda": "mmadapters.speech.lda_train:RECIPE",
    "clip-pretrain": "mmadapters.vision.clip_pretrain:RECIPE",
    "vlt5-pretrain": "mmadapters.vision.vlt5_pretrain:RECIPE",
    "diffusion-pretrain": "mmadapters.vision.diffusion_pretrain:RECIPE",
}

PROG = "mmadapters train"


def register_recipe(name: str, target: str) -> None:
    """Make ``mmadapters train <name>`` run the Recipe at ``target`` ("module:attribute")."""
    module, sep, attr = target.partition(":")
    if not name or not sep or not module or not attr:
        raise ValueError(f"register_recipe({name!r}, {target!r}): expected a name and a 'module:attribute' target")
    RECIPES[name] = target


def known_recipes() -> dict[str, str]:
    return dict(sorted(RECIPES.items()))


def add_train_parser(sub) -> argparse.ArgumentParser:
    """Add the ``train`` subcommand to the subparsers object ``sub``."""
    p = sub.add_parser("train", help="train a recipe's adapters (typed YAML config, DDP, resumable)",
                       description="Train adapters with a recipe. The YAML has three sections: output (run folder), "
                       "trainer (steps, batch_size, lr, schedule, eval_every, ...) and recipe (the recipe's own "
                       "settings); unknown keys are errors. Run under torchrun for DistributedDataParallel.")
    add = p.add_argument
    add("recipe", nargs="?", default=None, help="recipe name (see --list)")
    add("--list", action="store_true", help="list the registered recipes and exit")
    add("--config", default=None, help="YAML run config (output / trainer / recipe sections)")
    add("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set trainer.steps=10 --set recipe.variant=lora (repeatable)")
    add("--output", default=None, help="run folder (overrides the config's output)")
    add("--resume", action="store_true", help="continue the run in the output folder from its train_state.pt")
    add("--device", default=None, help="cpu, cuda, cuda:1 (overrides trainer.device; under torchrun cuda = each rank's GPU)")
    p.set_defaults(func=run_train)
    return p


def _error(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def list_recipes() -> list[tuple[str, str, str]]:
    """(name, target, description or why it cannot be imported) for every registered recipe."""
    from mmadapters.training.recipe import load_recipe

    rows = []
    for name, target in known_recipes().items():
        try:
            description = load_recipe(name, target).description or "(no description)"
        except Exception as err:  # noqa: BLE001 - a broken recipe must not hide the others
            description = f"(unavailable: {err})"
        rows.append((name, target, description))
    return rows


def _print_summary(summary, run) -> None:
    print(f"trained {summary.steps} steps of {summary.parameters.get('trainable', '?'):,} trainable parameters "
          f"({summary.parameters.get('total', '?'):,} in all) in {summary.timings.get('total_s', 0):.1f}s"
          + (f", resumed from step {summary.resumed_from}" if summary.resumed_from is not None else ""))
    if summary.best_step is not None:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in summary.best_metrics.items())
        print(f"best validation {summary.select_metric} ({summary.select_mode}) at step {summary.best_step}: {shown}")
        print(f"best adapters: {summary.best_dir}")
    else:
        print(f"no validation improved {summary.select_metric}: no best/ was written")
    print(f"last adapters: {summary.last_dir}")
    print(f"summary: {run.output}/train_summary.json, history: {run.output}/history.jsonl")


def run_train(args: argparse.Namespace) -> int:
    """The ``train`` subcommand. Returns the exit status (2 for a bad config or input)."""
    if getattr(args, "list", False):
        for name, target, description in list_recipes():
            print(f"{name:<16} {description}\n{'':<16} ({target})")
        return 0
    if not args.recipe:
        return _error("a recipe name is required (mmadapters train --list shows them)")
    if args.recipe not in RECIPES:
        return _error(f"unknown recipe {args.recipe!r}; known recipes: {', '.join(known_recipes())}")

    from mmadapters.training.config_io import ConfigError, Origins, apply_overrides, load_yaml
    from mmadapters.training.recipe import build_run_config, load_recipe

    try:
        recipe = load_recipe(args.recipe, RECIPES[args.recipe])
        data = load_yaml(args.config) if args.config else {}
        flags = {"trainer.device": "--device"} if args.device is not None else {}
        source = Origins(args.config or "(no --config)", args.overrides, data, flags)
        run = build_run_config(recipe, apply_overrides(data, args.overrides), source=source, output=args.output,
                               device=args.device)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        return _error(str(err))
    device_from = source.at("trainer.device")  # "--device", "--set trainer.device=cuda" or the file
    device_from = {"--device": f"--device {args.device}", str(source): f"{source}: trainer.device {run.trainer.device}"}.get(
        device_from, device_from)
    return _train(recipe, run, resume=args.resume, device_from=device_from)


def _train(recipe, run, *, resume: bool, device_from: str | None = None) -> int:
    import contextlib
    from pathlib import Path

    from mmadapters import distributed
    from mmadapters.training.checkpoint import (
        RunFolderBusy,
        check_resumable,
        comparable_config,
        load_train_state,
        prepare_output,
        run_lock,
    )
    from mmadapters.training.config_io import ConfigError, dump_yaml
    from mmadapters.training.trainer import RankZeroFailed, check_device, run_on_main, seed_everything, train

    output = Path(run.output)
    main = True
    try:
        check_device(run.trainer.device, device_from)  # before anything is written or loaded
        distributed.init_from_env(run.trainer.device)
        main = distributed.is_main()
        run.trainer.device = str(distributed.device_for_rank(run.trainer.device))

        def prepare() -> None:  # refuse before config.yaml is touched
            state_path = prepare_output(output, resume)
            if resume:
                comparable = comparable_config(run.to_mapping()["trainer"], run.to_mapping())
                check_resumable(load_train_state(state_path), state_path, comparable=comparable, params=None)
            dump_yaml(run.to_mapping(), output / "config.yaml")

        with contextlib.ExitStack() as lock:
            run_on_main(lambda: lock.enter_context(run_lock(output)) and None)  # held until the run ends
            run_on_main(prepare)
            seed_everything(run.trainer.seed, 0)  # every rank builds the same base and the same initial adapters
            task = recipe.build_task(run.recipe, run.trainer)
            summary = train(task, run.trainer, output, resume=resume,
                            run_config={**run.to_mapping(), "recipe_name": recipe.name})
    except (ConfigError, FileNotFoundError, FileExistsError, NotADirectoryError, ValueError, RunFolderBusy) as err:
        return _error(str(err)) if main else 2
    except RankZeroFailed:
        return 2  # rank 0 reports it
    except FloatingPointError as err:
        if main:
            print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    finally:
        if distributed.is_distributed():
            import gc

            gc.collect()  # release DDP objects before their process group goes
        distributed.cleanup()
    if main:
        _print_summary(summary, run)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m mmadapters.eval.train_cli <recipe> ...`` (the same as ``mmadapters train``)."""
    parser = argparse.ArgumentParser(prog="mmadapters")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    args = parser.parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
