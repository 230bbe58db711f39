"""Every command README.md and docs/results.md show that runs this project parses with its program's real parser.

Nothing runs past the parse (no training, no downloads, no data generation): see tests/doc_commands.py. A failure
names the doc file and line of each command, the command and the parser's message.
"""

from __future__ import annotations

import collections
import textwrap

from doc_commands import DOCS, check, check_markdown, doc_commands, extract


def test_doc_commands_parse():
    commands = doc_commands()
    outcomes = check(commands)
    counts = collections.Counter(o.status for o in outcomes)
    print(f"\n{len(outcomes)} commands: {counts['ok']} parse, {counts['fail']} fail, {counts['skip']} skipped")
    for o in outcomes:
        if o.status == "skip":
            print(f"  skipped {o}")
    # the extraction still finds what the docs hold: every doc, every kind of program
    assert {c.file for c in commands} == set(DOCS)
    assert {c.kind for c in commands} >= {"cli", "module", "script", "shell"}
    assert counts["ok"] >= 100, counts
    failures = [str(o) for o in outcomes if o.status == "fail"]
    assert not failures, f"{len(failures)} doc command(s) do not match the code:\n" + "\n".join(failures)


BOGUS = textwrap.dedent("""\
    Good: `mmadapters fewshot-compare --task synth-novel --shots 4 --seeds 0,1,2`.

    ```bash
    mmadapters fewshot-compare --task synth-novel --shotz 4
    OMP_NUM_THREADS=1 nice -n 19 python scripts/run_lda.py --data d --out o \\
        --no-such-flag 3
    mmadapters evaluate zeroshot
    python -m mmadapters.video.synth motion --n 6 --out o --nope
    .venv/bin/python bench/core.py --threads 1 --rank 4 --bogus
    mmadapters train vl-adapter --config configs/vl-adapter.yaml --set recipe.variantz=lora
    python scripts/run_lda.py --data d --out o --lda-step 5
    ```
    """)


def test_checker_rejects_bogus_flags():
    """The same checker fails on a flag, subcommand or --set key the code does not have, at the right line."""
    outcomes = check_markdown(BOGUS, "bogus.md")
    by_line = {o.command.line: o for o in outcomes}
    assert by_line[1].status == "ok", by_line[1]
    expected = {
        4: "unrecognized arguments: --shotz",
        5: "unrecognized arguments: --no-such-flag",
        7: "invalid choice: 'evaluate'",
        8: "unrecognized arguments: --nope",
        9: "unrecognized arguments: --bogus",
        10: "recipe.variantz: unknown key",
        11: "--lda-step is not a flag; argparse takes it as an abbreviation of --lda-steps",
    }
    for line, message in expected.items():
        assert by_line[line].status == "fail", by_line[line]
        assert message in by_line[line].message, by_line[line]
        assert str(by_line[line]).startswith(f"bogus.md:{line}: ")
    assert len(outcomes) == 1 + len(expected)


def test_extraction_of_shell_syntax():
    text = textwrap.dedent("""\
        Run `python -m mmadapters.speech.synth --languages en,de
        --out data/speech` first; `mmadapters eval <task>` is any task and `~/.cache/mmadapters` a folder.

        ```bash
        git clone <repo> /tmp/x && cd /tmp/x && time bash scripts/test.sh -k lora  # a comment
        nohup timeout 60 env A=1 mmadapters train --list > log.txt 2>&1 &
        torchrun --nproc_per_node 2 --no-python mmadapters train vl-adapter --config configs/vl-adapter.yaml
        mmadapters eval asr --manifest m.jsonl [--decode greedy|beam] | tee out.txt
        mmadapters eval vqa --annotations ... --adapters runs/x/best
        ```

        ```python
        mmadapters = "not a command"
        ```

            OMP_NUM_THREADS=1 python scripts/run_vl_adapter.py --data d \\
              --out o --quiet
        """)
    commands = extract(text, "x.md")
    shown = [(c.line, c.kind, c.target, c.argv, c.skip) for c in commands]
    assert shown == [
        (1, "module", "mmadapters.speech.synth", ["--languages", "en,de", "--out", "data/speech"], None),
        (2, "cli", "mmadapters", ["eval", "<task>"], None),
        (5, "shell", "scripts/test.sh", ["-k", "lora"], None),
        (6, "cli", "mmadapters", ["train", "--list"], None),
        (7, "cli", "mmadapters", ["train", "vl-adapter", "--config", "configs/vl-adapter.yaml"], None),
        (8, "cli", "mmadapters", ["eval", "asr", "--manifest", "m.jsonl", "--decode", "greedy"], None),
        (8, "cli", "mmadapters", ["eval", "asr", "--manifest", "m.jsonl", "--decode", "beam"], None),
        (9, "cli", "mmadapters", ["eval", "vqa", "--annotations", "...", "--adapters", "runs/x/best"], "an ... placeholder"),
        (16, "script", "scripts/run_vl_adapter.py", ["--data", "d", "--out", "o", "--quiet"], None),
    ]
    outcomes = {(o.command.line, tuple(o.command.argv)): o.status for o in check(commands)}
    assert outcomes[(2, ("eval", "<task>"))] == "skip"  # a placeholder where a real task is needed: counted
    assert outcomes[(9, ("eval", "vqa", "--annotations", "...", "--adapters", "runs/x/best"))] == "skip"
    assert [s for k, s in outcomes.items() if k[0] not in (2, 9)] == ["ok"] * 7
