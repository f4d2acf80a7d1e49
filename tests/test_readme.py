"""The README's two set-up commands are what CI and newcomers run: keep them honest."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    match = re.search(r"^TEST_COMMAND='(.*)'$", ci, flags=re.M)
    assert match, ".ci/run must define TEST_COMMAND"
    assert match.group(1) in _bash_blocks(readme)


def test_readme_has_exactly_two_setup_commands_both_install_torch_cpu_first():
    setup = (ROOT / "README.md").read_text().split("## Set up", 1)[1].split("\n## ", 1)[0]
    blocks = _bash_blocks(setup)
    assert len(blocks) == 2
    for block in blocks:
        assert block.startswith("pip install torch==2.13.0 && pip install -e ")
    assert "pytest" in blocks[1]


def test_every_cli_command_is_in_the_readme_reference():
    from xmllm.cli import build_parser

    readme = (ROOT / "README.md").read_text()
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name in sub.choices:
        assert f"`xmllm {name}" in readme, f"command {name} missing from the README reference"
