"""The README's quickstart runs as written, and CI runs the README's test command."""

import pathlib
import re

ROOT = pathlib.Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def test_quickstart_runs_and_learns(capsys):
    code = re.search(r"## Quickstart\n\n```python\n(.*?)```", README, re.DOTALL).group(1)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "up_proj" in printed and "accuracy 100%" in printed
    assert float(namespace["value"]) < 0.1


def test_models_example_runs_and_answers(capsys):
    code = re.search(r"## Models\n.*?```python\n(.*?)```", README, re.DOTALL).group(1)
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "Paris" in printed


def test_ci_runs_the_readme_test_command():
    command = (ROOT / ".ci/run").read_text().strip().splitlines()[-1]
    assert f"```bash\n{command}\n```" in README
