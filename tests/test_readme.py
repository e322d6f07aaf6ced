"""The shell commands of README.md and bench/README.md name scripts, flags and local folders that exist: every
`--flag` after a repository script in a ```bash block is one that script's -h lists, and every local --model
folder is a diffusers folder. A renamed flag or a moved folder fails here before a reader meets it."""
import importlib.util
import os
import re
import shlex

import pytest
from conftest import ROOT

# scripts a README command may run, by the path it names; flash_inpaint.py is made by the README's own diff
SCRIPTS = {name: os.path.join(ROOT, name) for name in (
    "flash_sd.py", "flash_sdxl.py", "flash_adapter.py", "flash_pixart.py", "flash_sd3.py", "flash_flux.py",
    "bench/toy.py", "bench/toy_diagnose.py", "bench/eval.py", "bench/speed.py")}
SCRIPTS["flash_inpaint.py"] = SCRIPTS["flash_sd.py"]  # the diff adds no flag
NOT_OURS = {"make_shards.py"}  # the README's own snippet, saved by the reader


def readme_commands(names=("README.md", "bench/README.md")):
    """(script, its arguments) for every command in a ```bash block that runs a .py file."""
    text = "\n".join(open(os.path.join(ROOT, name)).read() for name in names)
    out = []
    for block in re.findall(r"^```bash\n(.*?)^```$", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if not line or line.startswith("#") or ".py" not in line:
                continue
            words = shlex.split(line.split("&&")[-1])
            at = next((i for i, w in enumerate(words) if w.endswith(".py")), None)
            if at is not None:
                out.append((words[at], words[at + 1:]))
    return out


COMMANDS = readme_commands()


def help_flags(path, capsys):
    spec = importlib.util.spec_from_file_location(f"readme_{os.path.basename(path)[:-3]}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(SystemExit):
        mod.parse_args(["-h"])
    return set(re.findall(r"(--[a-z][a-z0-9_]*)", capsys.readouterr().out))


def test_the_readme_runs_the_scripts_it_should():
    front = {script for script, _ in readme_commands(["README.md"])}
    assert {"bench/toy.py", "flash_sd.py", "flash_sdxl.py", "flash_adapter.py", "flash_pixart.py", "flash_sd3.py",
            "flash_flux.py", "bench/eval.py"} <= front
    names = {script for script, _ in COMMANDS}
    assert {"bench/speed.py", "bench/toy_diagnose.py"} <= names
    assert names <= set(SCRIPTS) | NOT_OURS, names - set(SCRIPTS) - NOT_OURS


@pytest.mark.parametrize("script", sorted({s for s, _ in COMMANDS} - NOT_OURS))
def test_every_flag_in_a_readme_command_is_one_the_script_takes(script, capsys):
    known = help_flags(SCRIPTS[script], capsys)
    assert "--help" in known and len(known) > 3  # the help text was read
    distill = help_flags(SCRIPTS["flash_sd.py"], capsys) if script == "bench/toy.py" else set()
    for _, words in (c for c in COMMANDS if c[0] == script):
        flags = [w for w in words if w.startswith("--") and " " not in w]  # a quoted value holds spaces
        unknown = [w.split("=")[0] for w in flags if w.split("=")[0] not in known]
        assert not unknown, f"README: `{script} {' '.join(words)}` names flags {script} does not take: {unknown}"
        pairs = [w.split("=", 1) for w in words if w.startswith("--distill_flags=")]
        for flag, value in list(zip(words, words[1:])) + pairs:  # toy.py passes --distill_flags on to flash_sd.py
            if flag == "--distill_flags":
                unknown = [w for w in value.split() if w.startswith("--") and w not in distill]
                assert not unknown, f"README: --distill_flags {value!r} names flags flash_sd.py does not take"
        for flag, value in zip(words, words[1:]):
            if flag == "--model" and value.startswith(("bench/", "./")):  # a folder in this repository
                assert os.path.isfile(os.path.join(ROOT, value, "model_index.json")), f"README: no model at {value}"


def test_a_renamed_flag_would_be_caught(capsys):
    """The check above can fail: a flag the scripts do not take is not in their help."""
    known = help_flags(SCRIPTS["flash_sd.py"], capsys)
    assert "--phase_steps" in known and "--phase_step" not in known and "--num_teacher_step" not in known


def anchor(heading):
    """GitHub's anchor for a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_between_the_readmes_lands():
    """Each relative link in either README names a file of the repository and, after #, one of its headings."""
    for name in ("README.md", "bench/README.md"):
        text = open(os.path.join(ROOT, name)).read()
        links = re.findall(r"\]\(([^)\s]+)\)", text)
        assert len(links) > 5, name
        for link in links:
            if link.startswith(("http://", "https://")):
                continue
            path, _, frag = link.partition("#")
            target = os.path.normpath(os.path.join(ROOT, os.path.dirname(name), path)) if path else os.path.join(ROOT, name)
            assert os.path.exists(target), f"{name}: link {link}: no {path}"
            if frag:
                prose = re.sub(r"^```.*?^```$", "", open(target).read(), flags=re.S | re.M)  # no code blocks
                headings = re.findall(r"^#+ (.+)$", prose, flags=re.M)
                assert frag in {anchor(h) for h in headings}, f"{name}: link {link}: no such heading"


def test_every_python_block_compiles():
    """A snippet cut short or pasted into prose (an unclosed fence) fails to compile here."""
    for name in ("README.md", "bench/README.md"):
        text = open(os.path.join(ROOT, name)).read()
        assert len(re.findall(r"^```", text, flags=re.M)) % 2 == 0, f"{name}: an unclosed code fence"
        blocks = re.findall(r"^```python\n(.*?)^```$", text, flags=re.S | re.M)
        assert blocks, name
        for i, block in enumerate(blocks):
            compile(block, f"{name}, python block {i + 1}", "exec")
