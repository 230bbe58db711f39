"""The commands the docs show that run this project, checked against the real argparse parsers without running them.

Used by tests/test_docs_commands.py. :func:`extract` finds, in a markdown file, every shell command inside a
fenced or indented code block or an inline code span that invokes this project: ``mmadapters ...`` (the console
script of pyproject.toml), ``python -m mmadapters.<module> ...``, ``python scripts/<name>.py ...``,
``python bench/<name>.py ...`` (also bare ``scripts/<name>.py ARGS``) and ``bash scripts/<name>.sh ...``. It joins
``\\`` continuations, splits ``&&`` / ``||`` / ``;`` / ``|`` chains, drops env prefixes (``VAR=1``, ``nice -n 19``,
``nohup``, ``time``, ``timeout``, ``env``, ``torchrun ... [--no-python]``, ``.venv/bin/python``), redirections and
``# comments``, and expands ``[optional]`` groups and ``a|b`` alternatives into one command per alternative.

:func:`check` parses each command with its program's own parser: the program runs in this process up to its first
(outermost) ``ArgumentParser.parse_args`` / ``parse_known_args`` call, which is let through and then stopped by a
sentinel exception, so nothing after the parse (training, downloads, data generation) runs. For
``mmadapters train <recipe> --set KEY=VALUE`` each key is looked up in the recipe's typed config, and with an
existing ``--config`` file the whole run config is validated by the engine's own checker (no torch work).

Outcomes: ``ok``, ``fail`` (with the parser's message) or ``skip`` (a command with an ``...`` placeholder, or a
``<placeholder>`` where the parser needs a real choice); skips are counted, never silent. An inline code span that
is only part of a command (``mmadapters eval asr`` in a sentence) may lack required arguments: for those, a
"required" / "expected one argument" error falls back to checking that its subcommands and flags exist.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import io
import itertools
import os
import re
import runpy
import shlex
import signal
import subprocess
import sys
import tomllib
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "docs/results.md")
TIME_LIMIT_S = 20  # one command's parse; a program that gets further than its parse is stopped here

FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)")
SHELL_LANGS = {"", "bash", "sh", "shell", "console", "zsh", "text"}
ENV_ASSIGN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
PYTHON = re.compile(r"^(?:\S*/)?python(?:3(?:\.\d+)?)?$")
CLI = re.compile(r"^(?:\S*/bin/)?mmadapters$")  # mmadapters, .venv/bin/mmadapters (not ~/.cache/mmadapters)
SCRIPT = re.compile(r"^(?:\./)?((?:scripts|bench)/[\w.-]+\.py)$")
SHELL_SCRIPT = re.compile(r"^(?:\./)?((?:scripts|bench)/[\w.-]+\.sh)$")
PLACEHOLDER = re.compile(r"<[^<>\s]+>")
ALTERNATIVES = re.compile(r"^[^|\s]+(?:\|[^|\s]+)+$")
REDIRECT = re.compile(r"^(?:\d*|&)(?:>>?|<)(?:&\d+|&-)?")
CHAIN = {"&&", "||", "|", ";", "&", "|&"}
OVERRIDE_KEY = re.compile(r"^[a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*$")
INCOMPLETE = ("the following arguments are required", "expected one argument", "expected at least one argument")
# what a shell script does with its arguments (checked with the parser of the command they go to)
SHELL_ARGS = {
    "scripts/main.sh": ("cli", ["fewshot-compare"]),  # "$@" goes to `mmadapters fewshot-compare`
    "scripts/train_eval_all.sh": ("recipes", []),  # [recipe ...]
    "scripts/test.sh": ("pytest", []),  # extra arguments go to pytest: not checked here
}


@dataclass
class Command:
    """One command as a doc shows it; ``argv`` is what its program's parser gets."""

    file: str
    line: int
    text: str  # the command as written (continuations joined)
    inline: bool  # from an inline code span (may be only part of a command)
    kind: str  # cli | module | script | shell
    target: str  # "mmadapters", the module name or the repo-relative script path
    argv: list[str] = field(default_factory=list)
    skip: str | None = None  # why it is not parsed (a placeholder), counted

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class Outcome:
    command: Command
    status: str  # ok | fail | skip
    message: str = ""

    def __str__(self) -> str:
        return f"{self.command.where}: `{self.command.text}` ({' '.join([self.command.target, *self.command.argv])}): {self.message}"


# --- extraction -------------------------------------------------------------------------------------------------

def _snippets(text: str) -> list[tuple[int, str, bool]]:
    """(line, shell text, inline) for every logical code line (continuations joined) and every inline code span."""
    lines = text.splitlines()
    code: list[list[tuple[int, str]]] = []  # blocks of (line number, line)
    prose: list[list[tuple[int, str]]] = [[]]
    fence = None
    shell_block = False
    prev_indented = False
    prev_blank = True
    for number, line in enumerate(lines, 1):
        if fence is not None:
            stripped = line.strip()
            if stripped.startswith(fence) and set(stripped) == {fence[0]}:
                fence = None
            elif shell_block:
                code[-1].append((number, line))
            continue
        m = FENCE.match(line)
        if m:
            fence, shell_block = m.group(1), m.group(2).lower() in SHELL_LANGS
            code.append([])
            prose.append([])
            prev_blank, prev_indented = True, False
            continue
        blank = not line.strip()
        indented = not blank and (line.startswith("    ") or line.startswith("\t")) and (prev_blank or prev_indented)
        if indented:
            if not prev_indented:
                code.append([])
            code[-1].append((number, line))
        if blank:
            prose.append([])
        else:
            prose[-1].append((number, line))  # indented lines too: a list item's continuation may hold spans
        prev_blank, prev_indented = blank, indented

    out: list[tuple[int, str, bool]] = []
    for block in code:
        pending: tuple[int, str] | None = None
        for number, line in block:
            body = line.strip()
            if body.startswith("$ "):
                body = body[2:]
            start, joined = pending if pending else (number, "")
            if body.endswith("\\"):
                pending = (start, joined + body[:-1] + " ")
                continue
            pending = None
            out.append((start, joined + body, False))
        if pending:
            out.append((pending[0], pending[1], False))
    for block in prose:
        if not block:
            continue
        first = block[0][0]
        joined = "\n".join(line for _, line in block)
        for m in re.finditer(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", joined, re.S):
            out.append((first + joined.count("\n", 0, m.start()), m.group(2).replace("\n", " ").strip(), True))
    return sorted(out, key=lambda item: item[0])


def _segments(tokens: list[str]) -> list[list[str]]:
    """Split a token list at shell chain operators."""
    segments: list[list[str]] = [[]]
    for token in tokens:
        if token in CHAIN:
            segments.append([])
        elif token.endswith(";") and len(token) > 1:
            segments[-1].append(token[:-1])
            segments.append([])
        else:
            segments[-1].append(token)
    return [s for s in segments if s]


def _strip_prefixes(tokens: list[str]) -> list[str]:
    """Drop env assignments and wrappers (nice, nohup, time, timeout, env, torchrun) before the program."""
    i = 0
    while i < len(tokens):
        t = tokens[i]
        if ENV_ASSIGN.match(t) or t in ("nohup", "time", "exec", "command"):
            i += 1
        elif t == "env":
            i += 1
            while i < len(tokens) and (tokens[i].startswith("-") or ENV_ASSIGN.match(tokens[i])):
                i += 2 if tokens[i] in ("-u", "--unset", "-C", "--chdir") else 1
        elif t == "nice":
            i += 1
            if i < len(tokens) and tokens[i] in ("-n", "--adjustment"):
                i += 2
            elif i < len(tokens) and tokens[i].startswith("-"):
                i += 1
        elif t == "timeout":
            i += 1
            while i < len(tokens) and tokens[i].startswith("-"):
                i += 2 if tokens[i] in ("-s", "-k", "--signal", "--kill-after") else 1
            i += 1  # the duration
        elif t == "torchrun" or t.endswith("/torchrun"):
            i += 1
            no_python = module = False
            while i < len(tokens) and tokens[i].startswith("-"):
                opt = tokens[i]
                if opt in ("--no-python", "--no_python"):
                    no_python = True
                elif opt in ("-m", "--module"):
                    module = True
                i += 1 if ("=" in opt or opt in ("--no-python", "--no_python", "-m", "--module", "--standalone",
                                                   "--run-path", "--run_path")) else 2
            rest = tokens[i:]
            return rest if no_python else ["python", "-m", *rest] if module else ["python", *rest]
        else:
            break
    return tokens[i:]


def _strip_redirections(tokens: list[str]) -> list[str]:
    out: list[str] = []
    skip_next = False
    for t in tokens:
        if skip_next:
            skip_next = False
            continue
        if PLACEHOLDER.fullmatch(t):
            out.append(t)
            continue
        m = REDIRECT.match(t)
        if m:
            skip_next = m.end() == len(t) and not t.endswith(("&1", "&2", "&-"))  # `> file`: the target follows
            continue
        out.append(t)
    return out


def _classify(tokens: list[str]) -> tuple[str, str, list[str]] | None:
    """(kind, target, argv) when ``tokens`` run this project, else None."""
    if not tokens:
        return None
    prog = tokens[0]
    if CLI.match(prog):
        return "cli", "mmadapters", tokens[1:]
    if PYTHON.match(prog):
        i = 1
        while i < len(tokens) and tokens[i].startswith("-") and tokens[i] not in ("-m", "-c", "-"):
            i += 2 if tokens[i] in ("-X", "-W", "-Q") else 1
        if i >= len(tokens) or tokens[i] in ("-c", "-"):
            return None
        if tokens[i] == "-m":
            module = tokens[i + 1] if i + 1 < len(tokens) else ""
            if module == "mmadapters" or module.startswith("mmadapters."):
                return "module", module, tokens[i + 2:]
            return None
        m = SCRIPT.match(tokens[i])
        return ("script", m.group(1), tokens[i + 1:]) if m else None
    if prog in ("bash", "sh"):
        i = 1
        while i < len(tokens) and tokens[i].startswith("-"):
            i += 1
        m = SHELL_SCRIPT.match(tokens[i]) if i < len(tokens) else None
        return ("shell", m.group(1), tokens[i + 1:]) if m else None
    # a bare path is a command only with arguments (`scripts/x.py --device cuda`); alone it names the file
    m = SCRIPT.match(prog)
    if m and len(tokens) > 1:
        return "script", m.group(1), tokens[1:]
    m = SHELL_SCRIPT.match(prog)
    if m and len(tokens) > 1:
        return "shell", m.group(1), tokens[1:]
    return None


def _expand(argv: list[str]) -> list[list[str]]:
    """``[--flag VALUE]`` groups become plain tokens; ``a|b|c`` gives one argv per alternative."""
    cleaned = []
    for t in argv:
        if t.startswith("[") and len(t) > 1 and "]" not in t[1:-1]:
            t = t[1:]
        if t.endswith("]") and "[" not in t:
            t = t[:-1]
        if t and t not in ("[", "]"):
            cleaned.append(t)
    choices = [t.split("|") if ALTERNATIVES.match(t) else [t] for t in cleaned]
    return [list(combo) for combo in itertools.islice(itertools.product(*choices), 32)]


def _looks_like_project(text: str) -> bool:
    first = text.split()[:4]
    return any(CLI.match(w) or SCRIPT.match(w) or SHELL_SCRIPT.match(w) or w.startswith("mmadapters.") for w in first)


def extract(text: str, file: str) -> list[Command]:
    """Every command of this project that the markdown ``text`` shows (one per alternative of an ``a|b``)."""
    commands: list[Command] = []
    for line, snippet, inline in _snippets(text):
        if not snippet:
            continue
        try:
            tokens = shlex.split(snippet, comments=True)
        except ValueError as err:
            if _looks_like_project(snippet):  # a project command the shell could not even split: a finding
                commands.append(Command(file, line, snippet, inline, "unsplittable", snippet.split()[0],
                                        [f"(shell syntax: {err})"]))
            continue
        for segment in _segments(tokens):
            found = _classify(_strip_redirections(_strip_prefixes(segment)))
            if found is None:
                continue
            kind, target, argv = found
            shown = " ".join(segment)
            if any("..." in t or "\u2026" in t for t in argv):
                commands.append(Command(file, line, shown, inline, kind, target, argv, skip="an ... placeholder"))
                continue
            for variant in _expand(argv):
                commands.append(Command(file, line, shown, inline, kind, target, variant))
    return commands


def doc_commands() -> list[Command]:
    return [c for doc in DOCS for c in extract((ROOT / doc).read_text(encoding="utf-8"), doc)]


# --- parsing without running ------------------------------------------------------------------------------------

class _Parsed(BaseException):
    """Raised right after the outermost parse of a program succeeded (BaseException: no `except Exception` eats it)."""

    def __init__(self, parser: argparse.ArgumentParser, result):
        super().__init__("parsed")
        self.parser, self.result = parser, result


class _TimeLimit(BaseException):
    pass


_PARSE_METHODS = ("parse_args", "parse_known_args", "parse_intermixed_args", "parse_known_intermixed_args")


@contextlib.contextmanager
def _stop_after_parse(holder: dict):
    """Let the outermost ArgumentParser parse run, then raise :class:`_Parsed`; ``holder["parser"]`` is that parser
    (also when the parse fails). Nested parses (subparsers, parse_args -> parse_known_args) run normally."""
    originals = {name: getattr(argparse.ArgumentParser, name) for name in _PARSE_METHODS}
    depth = 0

    def wrap(orig):
        def wrapper(self, *args, **kwargs):
            nonlocal depth
            if depth == 0:
                holder["parser"] = self
            depth += 1
            try:
                result = orig(self, *args, **kwargs)
            finally:
                depth -= 1
            if depth == 0:
                raise _Parsed(self, result)
            return result

        return wrapper

    for name, orig in originals.items():
        setattr(argparse.ArgumentParser, name, wrap(orig))
    try:
        yield
    finally:
        for name, orig in originals.items():
            setattr(argparse.ArgumentParser, name, orig)


@contextlib.contextmanager
def _time_limit(seconds: int):
    def on_alarm(signum, frame):
        raise _TimeLimit()

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def _process_state(argv0: str, argv: list[str], path0: str | None):
    """sys.argv, sys.path, the working directory and the environment as a program would see them; restored after."""
    saved_argv, saved_path, saved_cwd, saved_env = sys.argv[:], sys.path[:], os.getcwd(), dict(os.environ)
    sys.argv = [argv0, *argv]
    if path0:
        sys.path.insert(0, path0)
    os.chdir(ROOT)
    try:
        yield
    finally:
        sys.argv[:] = saved_argv
        sys.path[:] = saved_path
        os.chdir(saved_cwd)
        for key in set(os.environ) - set(saved_env):
            del os.environ[key]
        os.environ.update(saved_env)


def console_script(name: str = "mmadapters"):
    """The function pyproject.toml's [project.scripts] names for ``name`` ("module:attr")."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        target = tomllib.load(f)["project"]["scripts"][name]
    module, _, attr = target.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _parses_arguments(source: str) -> bool:
    return "ArgumentParser" in source or "parse_args" in source or "build_parser" in source


def parse(kind: str, target: str, argv: list[str]) -> tuple[str, object, argparse.ArgumentParser | None]:
    """Run ``target`` up to its argument parse. ("parsed", result, parser), ("help", None, parser),
    ("error", message, parser) or ("broken", message, None)."""
    if kind == "cli":
        main = console_script("mmadapters")
        run, argv0, path0 = (lambda: main(list(argv))), "mmadapters", None
    elif kind == "module":
        spec = importlib.util.find_spec(target)
        if spec is None or not spec.origin:
            return "broken", f"no module named {target}", None
        if not _parses_arguments(Path(spec.origin).read_text(encoding="utf-8")):
            return "broken", f"{spec.origin} has no argparse parser: not run", None
        run, argv0, path0 = (lambda: runpy.run_module(target, run_name="__main__", alter_sys=True)), target, None
    elif kind == "script":
        path = ROOT / target
        if not path.is_file():
            return "broken", f"{target}: no such file", None
        if not _parses_arguments(path.read_text(encoding="utf-8")):
            return "broken", f"{target} has no argparse parser: not run", None
        run, argv0, path0 = (lambda: runpy.run_path(str(path), run_name="__main__")), str(path), str(path.parent)
    else:
        raise ValueError(kind)
    holder: dict = {}
    out, err = io.StringIO(), io.StringIO()
    try:
        with (_process_state(argv0, argv, path0), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err),
              warnings.catch_warnings(), _time_limit(TIME_LIMIT_S), _stop_after_parse(holder)):
            warnings.simplefilter("ignore")
            run()
    except _Parsed as parsed:
        return "parsed", parsed.result, parsed.parser
    except _TimeLimit:
        return "broken", f"still running after {TIME_LIMIT_S}s without having parsed its arguments", holder.get("parser")
    except SystemExit as e:
        if e.code in (0, None) and "parser" in holder:
            return "help", None, holder["parser"]
        lines = [ln for ln in err.getvalue().strip().splitlines() if ln.strip()]
        message = lines[-1] if lines else f"exit status {e.code!r}"
        return ("error" if "parser" in holder else "broken"), message, holder.get("parser")
    except Exception as e:  # noqa: BLE001 - a broken program is a finding, not a crash of the checker
        return "broken", f"{type(e).__name__}: {e}", holder.get("parser")
    return "broken", "finished without parsing its arguments with argparse", None


def _lookup_option(parser: argparse.ArgumentParser, token: str) -> tuple[argparse.Action | None, str | None]:
    """(action, its full option string) of ``token`` in ``parser``: exact, or an unambiguous prefix as argparse
    allows; (None, None) if the parser has no such option."""
    name = token.split("=", 1)[0]
    if name in parser._option_string_actions:
        return parser._option_string_actions[name], name
    if parser.allow_abbrev and name.startswith("--"):
        hits = {opt: a for opt, a in parser._option_string_actions.items() if opt.startswith(name)}
        if len(set(hits.values())) == 1:
            return next(iter(hits.values())), next(iter(hits))
    return None, None


def structure_error(parser: argparse.ArgumentParser, argv: list[str], *, exact: bool = False) -> str | None:
    """Its subcommands exist and every flag is one that the (sub)parser it goes to knows; None if so. For a partial
    command (that cannot be parsed) and, with ``exact``, after a parse: a flag argparse took only as an abbreviation
    of a longer one is an error (the doc shows a name the code does not have)."""
    i = 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("-") and len(token) > 1 and not re.fullmatch(r"-\d+(\.\d*)?", token):
            if token == "--":
                return None
            action, full = _lookup_option(parser, token)
            name = token.split("=", 1)[0]
            if action is None:
                return f"{parser.prog}: unrecognized argument {name}"
            if exact and full != name:
                return f"{parser.prog}: {name} is not a flag; argparse takes it as an abbreviation of {full}"
            takes = action.nargs != 0 and "=" not in token
            i += 1
            if takes:
                while i < len(argv) and not argv[i].startswith("-"):
                    i += 1
                    if action.nargs in (None, 1, "?"):
                        break
            continue
        subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if subparsers:
            choices = subparsers[0].choices
            if token not in choices:
                return f"{parser.prog}: invalid choice: {token!r} (choose from {', '.join(choices)})"
            parser = choices[token]
        i += 1
    return None


# --- mmadapters train: --set keys and the run config --------------------------------------------------------------

def _key_error(recipe, key: str) -> str | None:
    from mmadapters.training.trainer_config import TrainerConfig

    parts = key.split(".")
    if parts[0] == "output":
        return None if len(parts) == 1 else f"--set {key}: output is a path, not a section"
    cls = {"trainer": TrainerConfig, "recipe": recipe.config_class}.get(parts[0])
    if cls is None:
        return f"--set {key}: unknown section {parts[0]!r} (expected output, trainer or recipe)"
    for depth, name in enumerate(parts[1:], 2):
        if not dataclasses.is_dataclass(cls):
            return None  # a mapping or a free-form value: its inside is not typed
        names = [f.name for f in dataclasses.fields(cls)]
        if name not in names:
            return f"--set {key}: {'.'.join(parts[:depth])}: unknown key (expected one of: {', '.join(sorted(names))})"
        cls = typing.get_type_hints(cls).get(name)
    return None


def train_error(ns: argparse.Namespace, inline: bool) -> str | None:
    """``mmadapters train``'s checks that need no training: the recipe exists, ``--config`` (a repo file) exists,
    every ``--set`` key is a field of the recipe's config, and with the file the whole config validates."""
    if getattr(ns, "list", False):
        return None
    if not ns.recipe:
        return None if inline else "mmadapters train: a recipe name is required"
    if PLACEHOLDER.search(ns.recipe):
        return None
    from mmadapters.eval import train_cli
    from mmadapters.training.config_io import ConfigError, Origins, apply_overrides, load_yaml
    from mmadapters.training.recipe import build_run_config, load_recipe

    if ns.recipe not in train_cli.RECIPES:
        return f"mmadapters train: unknown recipe {ns.recipe!r}; known recipes: {', '.join(train_cli.known_recipes())}"
    recipe = load_recipe(ns.recipe, train_cli.RECIPES[ns.recipe])
    overrides = []
    for item in ns.overrides:
        key, eq, _ = item.partition("=")
        if not eq:
            return f"--set {item!r}: expected KEY=VALUE"
        if not OVERRIDE_KEY.match(key):
            continue  # KEY=VALUE, <key>=...: a placeholder
        problem = _key_error(recipe, key)
        if problem:
            return problem
        overrides.append(item)
    config = Path(ns.config) if ns.config else None
    if config is None or not (ROOT / config).is_file():
        if config is not None and config.parts[:1] == ("configs",):
            return f"--config {ns.config}: no such file in the repository"
        return None  # a run's own file (OUT/configs/...): only the keys were checked
    try:
        data = load_yaml(ROOT / config)
        source = Origins(str(config), overrides, data, {})
        build_run_config(recipe, apply_overrides(data, overrides), source=source, output=ns.output or "out/doc-check")
    except (ConfigError, ValueError, FileNotFoundError) as err:
        return str(err)
    return None


# --- the checker ----------------------------------------------------------------------------------------------------

def _shell_outcome(c: Command) -> Outcome:
    path = ROOT / c.target
    if not path.is_file():
        return Outcome(c, "fail", f"{c.target}: no such file")
    syntax = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=20)
    if syntax.returncode:
        return Outcome(c, "fail", f"bash -n {c.target}: {syntax.stderr.strip()}")
    how, prefix = SHELL_ARGS.get(c.target, (None, []))
    if c.argv and how == "cli":
        inner = Command(c.file, c.line, c.text, c.inline, "cli", "mmadapters", [*prefix, *c.argv])
        result = check_one(inner)
        return Outcome(c, result.status, f"(its arguments go to mmadapters {' '.join(prefix)}) {result.message}".strip())
    if c.argv and how == "recipes":
        from mmadapters.eval import train_cli

        unknown = [a for a in c.argv if a not in train_cli.RECIPES and not PLACEHOLDER.search(a)]
        if unknown:
            return Outcome(c, "fail", f"unknown recipe(s) {unknown}; known: {', '.join(train_cli.known_recipes())}")
    if c.argv and how is None:
        return Outcome(c, "fail", f"{c.target} takes no arguments this checker knows of (add it to SHELL_ARGS)")
    return Outcome(c, "ok", "exists, bash -n passes" + ("; arguments go to pytest (not checked)" if how == "pytest" else ""))


_cache: dict[tuple, tuple] = {}


def check_one(c: Command) -> Outcome:
    if c.skip:
        return Outcome(c, "skip", c.skip)
    if c.kind == "unsplittable":
        return Outcome(c, "fail", c.argv[0])
    if c.kind == "shell":
        return _shell_outcome(c)
    key = (c.kind, c.target, tuple(c.argv))
    if key not in _cache:
        _cache[key] = parse(c.kind, c.target, c.argv)
    status, result, parser = _cache[key]
    if status == "help":
        return Outcome(c, "ok", "prints its help")
    if status == "broken":
        return Outcome(c, "fail", str(result))
    if status == "error":
        message = str(result)
        hits = [t for t in c.argv if PLACEHOLDER.search(t) and t in message]
        if hits:
            return Outcome(c, "skip", f"placeholder {hits[0]} where the parser needs a real value ({message})")
        if c.inline and parser is not None and any(p in message for p in INCOMPLETE):
            problem = structure_error(parser, c.argv)
            if problem is None:
                return Outcome(c, "ok", f"part of a command: subcommands and flags exist ({message})")
            return Outcome(c, "fail", problem)
        return Outcome(c, "fail", message)
    if isinstance(result, tuple):  # parse_known_args at the top: leftovers are flags nobody takes
        result, extras = result
        if extras:
            return Outcome(c, "fail", f"unrecognized arguments: {' '.join(extras)}")
    problem = structure_error(parser, c.argv, exact=True)
    if problem:
        return Outcome(c, "fail", problem)
    if c.kind == "cli" and getattr(result, "command", None) == "train":
        problem = train_error(result, c.inline)
        if problem:
            return Outcome(c, "fail", problem)
    return Outcome(c, "ok", "parses")


def check(commands: list[Command]) -> list[Outcome]:
    return [check_one(c) for c in commands]


def check_markdown(text: str, file: str = "<text>") -> list[Outcome]:
    return check(extract(text, file))
