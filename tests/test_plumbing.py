"""The run plumbing (flag types, processes, compile, resume, checkpoints, the step's flags, metrics)
and main() are written out in every flash_*.py, as the same text: these checks keep a fix from landing
in one copy only, and keep the scripts within their reading budget. Source only: a second or so."""
import ast
import os

import pytest
from conftest import ROOT, SCRIPTS

HEADER = "# run plumbing: the same text in every flash_*.py"


def source(name):
    with open(os.path.join(ROOT, f"{name}.py")) as f:
        return f.read()


def plumbing(name):
    """The script's text from the plumbing header (and the rule above it) to its end."""
    text = source(name)
    assert text.count(HEADER) == 1, f"{name}.py: no plumbing header"
    start = text.rindex("\n", 0, text.index(HEADER) - 1) + 1
    return text[start:]


def first_difference(reference, text):
    """None when the two texts are the same; else the first differing line of each, numbered."""
    ours, theirs = reference.splitlines(), text.splitlines()
    if ours == theirs and reference == text:
        return None
    i = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    line = lambda lines: lines[i] if i < len(lines) else "<end of file>"  # noqa: E731
    return f"line {i + 1} of the block: {line(theirs)!r}, flash_sd.py has {line(ours)!r}"


def test_the_plumbing_and_main_are_the_same_text_in_every_script():
    reference = plumbing("flash_sd")
    for name in SCRIPTS:
        assert first_difference(reference, plumbing(name)) is None, f"{name}.py differs from flash_sd.py at " + \
            first_difference(reference, plumbing(name))


def test_a_fix_in_one_copy_only_would_be_caught():
    reference = plumbing("flash_sd")
    fixed = reference.replace("opt_d.step()", "opt_d.step()  # a fix in one copy only", 1)
    assert "a fix in one copy only" in first_difference(reference, fixed)
    assert first_difference(reference, reference + "\n# one more line\n") is not None
    assert first_difference(reference, reference) is None


def test_the_plumbing_defines_the_functions_main_calls_and_nothing_else_defines_them():
    """main() and the functions it runs live below the header, once; the backbone's functions above it."""
    names = {"checked", "check_flags", "checkpoints", "find_resume", "setup", "compile_blocks", "resume", "stop_signals",
             "any_rank", "save_checkpoint", "log_metrics", "main"}
    for name in SCRIPTS:
        tree = ast.parse(source(name))
        below = ast.parse(plumbing(name))
        defined_below = {n.name for n in below.body if isinstance(n, ast.FunctionDef)}
        defined = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
        assert names <= defined_below, f"{name}.py: {sorted(names - defined_below)} not in its plumbing"
        assert len(defined) == len(set(defined)), f"{name}.py defines a function twice"
        assert {"parse_args", "check_args", "build", "train_step", "sample_grid", "export_lora"} <= set(defined)


def depth(node, level=0):
    """The deepest nesting under node: `level` for its own body, one more inside each compound statement."""
    compound = (ast.If, ast.For, ast.While, ast.With, ast.Try, ast.FunctionDef)
    inner = [depth(child, level + isinstance(child, compound)) for child in ast.iter_child_nodes(node)
             if isinstance(child, ast.stmt)]
    return max([level, *inner])


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_the_script_reads_within_its_budget(name):
    text = source(name)
    long_lines = [i + 1 for i, line in enumerate(text.splitlines()) if len(line) > 100]
    assert not long_lines, f"{name}.py: lines over 100 columns: {long_lines[:10]}"
    main = next(n for n in ast.parse(text).body if isinstance(n, ast.FunctionDef) and n.name == "main")
    assert main.end_lineno - main.lineno + 1 <= 90
    assert depth(main, level=1) <= 5  # main's body is level 1; the old main() reached 7


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_each_message_is_at_most_two_source_lines(name):
    """Errors, log lines and argparse refusals: a message a reader sees whole in the source."""
    long = []
    for node in ast.walk(ast.parse(source(name))):
        func = getattr(node, "func", None)
        called = getattr(func, "attr", getattr(func, "id", ""))
        if isinstance(node, ast.Call) and called in ("UsageError", "RunError", "info", "ArgumentTypeError"):
            message = node.args[0] if node.args else None
            if message is not None and message.end_lineno - message.lineno > 1:
                long.append(message.lineno)
    assert not long, f"{name}.py: messages over two source lines at {long}"
