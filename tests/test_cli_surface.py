"""The command line covers every evaluator and every recipe, and building it imports no torch."""

import subprocess
import sys

EVAL_TASKS = ("zeroshot", "fewshot", "asr", "videoqa", "dfer", "vqa", "gqa", "nlvr", "caption")
RECIPES = ("tip-adapter", "caps-adapter", "vl-adapter", "tem-adapter", "fineclipper", "lda", "vlt5-pretrain", "clip-pretrain",
           "diffusion-pretrain")


def test_eval_train_report_without_torch():
    code = (
        "import sys, contextlib, io\n"
        "from mmadapters.eval import cli\n"
        "parser = cli.build_parser()\n"
        "sub = next(a for a in parser._actions if a.dest == 'command')\n"
        "eval_p = sub.choices['eval']\n"
        "tasks = next(a for a in eval_p._actions if a.dest == 'task').choices\n"
        "print(','.join(sorted(tasks)))\n"
        "print('report' in sub.choices and 'train' in sub.choices)\n"
        "from mmadapters.eval import train_cli\n"
        "print(','.join(sorted(train_cli.known_recipes())))\n"
        "print('torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    tasks, has_report_train, recipes, torch_loaded = proc.stdout.strip().splitlines()
    assert set(tasks.split(",")) == set(EVAL_TASKS)
    assert has_report_train == "True"
    assert set(RECIPES) <= set(recipes.split(","))
    assert torch_loaded == "False"


def test_every_recipe_resolves():
    from mmadapters.eval import train_cli
    from mmadapters.training.recipe import load_recipe

    for name in RECIPES:
        recipe = load_recipe(name, train_cli.RECIPES[name])
        assert recipe.name == name and recipe.config_class.__dataclass_fields__  # a typed config
