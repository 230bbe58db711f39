"""Pretrain the shipped tiny CLIP on generated stills: ``mmadapters train clip-pretrain``, then copy the model out.

    python scripts/pretrain_tiny_clip.py --output vision/assets/tiny_clip --steps 6000 --batch-size 128 --threads 2 --max-minutes 22
    python scripts/pretrain_tiny_clip.py ... --resume          # after a crash: the same command plus --resume

The recipe (data, loss, validation, output) is :mod:`mmadapters.vision.clip_pretrain`. This script runs it with
``configs/clip-pretrain.yaml`` in the run folder ``--run-dir`` (history, train_state.pt, best/, last/) and copies
``last/`` (``open_clip_config.json`` + fp16 ``open_clip_model.safetensors``, the ``local-dir:`` layout) into
``--output``. ``--batch-size`` counts images; any other value: ``--set KEY=VALUE`` (``trainer.lr=1e-3``,
``recipe.pool_size=4096``, ``trainer.device=cuda``, ...).
"""

from __future__ import annotations

import argparse
from pathlib import Path

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "clip-pretrain.yaml"
FLAGS = {"steps": "trainer.steps", "max_minutes": "trainer.max_minutes", "init": "recipe.init"}


def main(argv: list[str] | None = None, *, data: str = "stills", output: str = "vision/assets/tiny_clip",
         defaults: tuple[str, ...] = (), doc: str = __doc__) -> int:
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--output", type=Path, default=Path(output), help="local-dir folder the trained model is copied into")
    p.add_argument("--run-dir", type=Path, help="the engine's run folder (default: runs/clip-pretrain/<output name>)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --run-dir (same flags)")
    p.add_argument("--steps", type=int, help="optimizer steps (an upper bound with --max-minutes)")
    p.add_argument("--batch-size", type=int, help="images per step")
    p.add_argument("--max-minutes", type=float, help="wall-time budget; the cosine decay follows it")
    p.add_argument("--init", help="local-dir CLIP to start from ('none': random initialization)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)

    import torch

    from mmadapters.eval import train_cli
    from mmadapters.io import atomic_write_bytes
    from mmadapters.training.config_io import apply_overrides, load_yaml
    from mmadapters.training.recipe import build_run_config
    from mmadapters.vision.clip_pretrain import CONFIG_NAME, RECIPE, WEIGHTS_NAME

    if args.threads:
        torch.set_num_threads(args.threads)
    sets = [*defaults, f"recipe.data={data}"]
    sets += [f"{key}={'null' if str(v).lower() == 'none' else v}" for f, key in FLAGS.items() if (v := getattr(args, f)) is not None]
    sets += args.overrides
    if args.batch_size is not None:  # images -> items of the recipe
        try:
            recipe = build_run_config(RECIPE, apply_overrides(load_yaml(CONFIG), sets), source=str(CONFIG), output="-").recipe
            per_item = recipe.images_per_item()
        except ValueError as err:
            raise SystemExit(f"{Path(__file__).name}: {err}") from None
        if args.batch_size % per_item:
            raise SystemExit(f"--batch-size {args.batch_size}: expected a multiple of {per_item} (images per item)")
        sets.append(f"trainer.batch_size={args.batch_size // per_item}")
    run_dir = args.run_dir or Path("runs/clip-pretrain") / args.output.name
    train_cli.register_recipe(RECIPE.name, "mmadapters.vision.clip_pretrain:RECIPE")
    status = train_cli.main([RECIPE.name, "--config", str(CONFIG), "--output", str(run_dir),
                             *(a for s in sets for a in ("--set", s)), *(["--resume"] if args.resume else [])])
    if status:
        return status
    args.output.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        atomic_write_bytes(args.output / name, (run_dir / "last" / name).read_bytes())
    print(f"saved {run_dir / 'last'} to {args.output} ({(args.output / WEIGHTS_NAME).stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
