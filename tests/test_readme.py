"""The documents against the code.

* Every ```python block of README.md runs, as a script of its own (a fresh
  namespace), in a fresh directory holding a copy of docs/examples/; the blocks
  use tiny settings, so each takes seconds.
* Every ``python -m MODULE ARGS`` command of README.md, BUILD.md,
  docs/performance.md and docs/memory.md names a module that exists, and the
  module's own argument parser accepts ARGS. A command's placeholders
  (``CHECKOUT``, ``DIR``, ``W``, ``N``, ``BACKBONE``, ...) stand for a value the
  flag accepts, ``[...]`` marks optional flags, and the flags after ``--`` (an
  ``experiments.run`` command line for the benchmarks that start runs) are
  parsed by ``experiments.run``'s parser.

Commands are parsed in this process, not run: the parser comes from the
module's ``build_parser()`` (and ``parse_args`` where the module has one, which
reads ``--config``), or, for a module that builds its parser inside ``main``,
from ``main`` stopped at its ``parse_args`` call.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
COMMAND_DOCS = ("README.md", "BUILD.md", "docs/performance.md", "docs/memory.md")
# Modules whose flags are checked; any other module a command names (pytest) need only exist.
OUR_PACKAGES = ("experiments", "benchmarks", "lightcl_jax")
FENCE = re.compile(r"^```([\w-]*)[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
INLINE = re.compile(r"`([^`]+)`")
PLACEHOLDER = re.compile(r"^(?:[A-Z][A-Z0-9_:]*|<[^>]+>|\$\{?\w+\}?)$")
# An inline code span is a command when it starts with one (after environment settings);
# elsewhere in a span, "python -m ..." quotes a message.
INLINE_COMMAND = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)*python -m ")
EXAMPLE_VALUES = ("1", "0.5", "on", "placeholder")


def _text(name: str) -> str:
    return (ROOT / name).read_text()


def python_blocks(text: str) -> list[str]:
    """The bodies of the ```python fenced blocks of a markdown text."""
    return [body for lang, body in FENCE.findall(text) if lang == "python"]


def _command_lines(text: str) -> list[str]:
    """Candidate command lines: every line of the shell and plain fenced blocks
    (continuations joined), and every inline code span outside them that starts
    with a command (its line breaks joined)."""
    lines = []
    for lang, body in FENCE.findall(text):
        if lang in ("", "bash", "sh", "shell", "console"):
            lines += body.replace("\\\n", " ").splitlines()
    prose = FENCE.sub("", text)
    spans = [" ".join(span.split()) for span in INLINE.findall(prose)]
    lines += [span for span in spans if INLINE_COMMAND.match(span)]
    return [line for line in lines if "python -m " in line]


def commands(text: str) -> list[tuple[str, list[str]]]:
    """``(module, args)`` of every ``python -m MODULE ARGS`` command in ``text``.

    A shell comment ends a command, as do ``;``, ``&&`` and ``|``; ``[`` and ``]``
    around optional flags are dropped. An error message quoting a command's name
    (``python -m experiments.run: error: ...``) is not a command.
    """
    found = []
    for line in _command_lines(text):
        for segment in re.split(r"&&|;|\|", line):
            if "python -m " not in segment:
                continue
            try:
                tokens = shlex.split(segment[segment.index("python -m "):], comments=True)
            except ValueError:  # an unbalanced quote: not a command line
                continue
            if len(tokens) < 3 or not re.fullmatch(r"[\w.]+", tokens[2]):
                continue
            args = [token.strip("[]") for token in tokens[3:]]
            found.append((tokens[2], [arg for arg in args if arg]))
    return found


def _all_commands() -> list[tuple[str, str, list[str]]]:
    out, seen = [], set()
    for doc in COMMAND_DOCS:
        for module, args in commands(_text(doc)):
            key = (module, tuple(args))
            if key not in seen:
                seen.add(key)
                out.append((doc, module, args))
    return out


def _example_value(action: argparse.Action | None) -> str:
    """A value ``action`` accepts, to stand for a placeholder."""
    if action is None or (action.type is None and not action.choices):
        return "placeholder"
    candidates = [str(choice) for choice in action.choices or ()] + list(EXAMPLE_VALUES)
    for candidate in candidates:
        try:
            value = action.type(candidate) if callable(action.type) else candidate
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            continue
        if not action.choices or value in action.choices:
            return candidate
    return "placeholder"


def fill_placeholders(parser: argparse.ArgumentParser, args: list[str]) -> list[str]:
    """``args`` with each placeholder replaced by a value its flag accepts (a value of a
    flag with choices is never a placeholder: ``--signal TERM`` names one)."""
    filled = []
    for index, arg in enumerate(args):
        action = parser._option_string_actions.get(args[index - 1]) if index else None
        if PLACEHOLDER.match(arg) and not (action is not None and action.choices):
            filled.append(_example_value(action))   # a flag with choices names one of them
        else:
            filled.append(arg)
    return filled


class _Parsed(Exception):
    """Raised by the patched ``parse_args`` once a module's parser accepted the flags."""


def parse_command(module_name: str, args: list[str], monkeypatch) -> None:
    """Parses ``args`` with ``module_name``'s parser; SystemExit(2) when it refuses them."""
    module = importlib.import_module(module_name)
    if hasattr(module, "build_parser"):
        parser = module.build_parser()
        filled = fill_placeholders(parser, args)
        if callable(getattr(module, "parse_args", None)):
            module.parse_args(filled)          # experiments.run: --config's FLAGS too
        else:
            parser.parse_args(filled)
        return
    source = inspect.getsource(module)
    if not re.search(r"ArgumentParser\(|Parser\(|parse_args\(", source):
        assert not args, f"{module_name} takes no flags, but the command gives {args}"
        return
    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(parser, argv=None, namespace=None):
        original(parser, fill_placeholders(parser, list(argv if argv is not None
                                                          else sys.argv[1:])), namespace)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    monkeypatch.setattr(sys, "argv", [module_name, *args])
    with pytest.raises(_Parsed):
        if inspect.signature(module.main).parameters:
            module.main(list(args))
        else:
            module.main()


COMMANDS = _all_commands()


def test_the_documents_hold_commands_and_python_examples():
    modules = {module for _, module, _ in COMMANDS}
    assert {"experiments.run", "experiments.compare", "pytest"} <= modules
    assert python_blocks(_text("README.md"))


def test_the_extraction_reads_fences_continuations_comments_and_placeholders():
    text = ("Run `python -m experiments.run --seeds 3` or\n\n```bash\n"
            "python -m benchmarks.bench_seeds [--seeds 5] \\\n  -- --dataset digits  # note\n"
            "XLA_FLAGS=x python -m experiments.run --nf 4 && echo done\n```\n\n"
            "`python -m experiments.run: error: lr must be > 0`\n")
    assert commands(text) == [("benchmarks.bench_seeds", ["--seeds", "5", "--", "--dataset",
                                                           "digits"]),
                              ("experiments.run", ["--nf", "4"]),
                              ("experiments.run", ["--seeds", "3"])]
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget-mb", type=float)
    parser.add_argument("--signal", choices=("KILL", "TERM"))
    parser.add_argument("--ref")
    assert fill_placeholders(parser, ["--budget-mb", "N", "--signal", "TERM", "--ref", "CHECKOUT"]
                             ) == ["--budget-mb", "1", "--signal", "TERM", "--ref", "placeholder"]


@pytest.mark.parametrize("doc,module,args", COMMANDS,
                         ids=[f"{doc}:{module}:{i}" for i, (doc, module, _) in enumerate(COMMANDS)])
def test_a_documented_command_names_a_module_and_flags_that_exist(doc, module, args, monkeypatch,
                                                                  capsys):
    if PLACEHOLDER.match(module):  # "python -m MODULE ..." in prose
        return
    assert importlib.util.find_spec(module) is not None, f"{doc}: no module {module}"
    if not module.startswith(OUR_PACKAGES):
        return
    monkeypatch.chdir(ROOT)  # import paths in commands (docs/examples/...) are the checkout's
    own, run_flags = (args[:args.index("--")], args[args.index("--") + 1:]) if "--" in args \
        else (args, [])
    try:
        parse_command(module, own, monkeypatch)
        run_flags = [flag for flag in run_flags if not PLACEHOLDER.match(flag)]
        if run_flags:  # the command the benchmark starts: experiments.run, or --command's
            started = own[own.index("--command") + 1] if "--command" in own else "run"
            monkeypatch.undo()
            monkeypatch.chdir(ROOT)
            parse_command(f"experiments.{started}", run_flags, monkeypatch)
    except SystemExit as stop:
        assert stop.code in (0, None), (f"{doc}: python -m {module} {shlex.join(args)} is "
                                        f"refused: {capsys.readouterr().err.strip()}")


# Runs README's examples one after another in one process (one JAX start), each in a
# fresh namespace as a script of its own, and reports every one that fails.
_DRIVER = """
import json, sys, traceback
failed = []
for index, block in enumerate(json.load(open(sys.argv[1]))):
    try:
        exec(compile(block, f"<README.md python block {index}>", "exec"), {"__name__": "__main__"})
    except BaseException:
        failed.append(f"block {index}:\\n{block}\\n{traceback.format_exc()}")
print("\\n\\n".join(failed), file=sys.stderr)
sys.exit(1 if failed else 0)
"""


def test_the_readme_python_examples_run(tmp_path):
    blocks = python_blocks(_text("README.md"))
    shutil.copytree(ROOT / "docs" / "examples", tmp_path / "docs" / "examples")
    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    (tmp_path / "driver.py").write_text(_DRIVER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "driver.py", "blocks.json"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"README examples failed:\n{done.stderr[-6000:]}"
