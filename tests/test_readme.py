"""The README stays true: its code runs or names what exists, its paths, targets and commands exist."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)
BASH_BLOCKS = re.findall(r"```bash\n(.*?)```", README, re.S)


def test_the_usage_example_runs() -> None:
    """The first Python block is self-contained: it runs as written."""
    assert "import iama_kernels as ik" in PYTHON_BLOCKS[0]
    namespace: dict = {}
    exec(compile(PYTHON_BLOCKS[0], "README.md", "exec"), namespace)  # the README's own code
    assert namespace["out"].loss.ndim == 0 and namespace["logp"].grad is not None


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_every_python_block_imports_names_that_exist(index: int) -> None:
    tree = ast.parse(PYTHON_BLOCKS[index].replace("...", "None"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] == "trl":
                pytest.importorskip("trl")
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{node.module} has no {alias.name}"


def _keyword_calls(block: str) -> list[tuple[str, list[str]]]:
    tree = ast.parse(block.replace("...", "None"))
    calls = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute)):
            name = node.func.id if isinstance(node.func, ast.Name) else node.func.attr
            calls.append((name, [k.arg for k in node.keywords if k.arg is not None]))
    return calls


def test_the_keyword_arguments_the_examples_use_are_accepted() -> None:
    """A renamed argument breaks this test before it breaks a reader's code."""
    import iama
    import iama_kernels

    known = {"NonLinearGRPOTrainer": iama.NonLinearGRPOTrainer, "TrainerConfig": iama.TrainerConfig,
             "group_advantages": iama_kernels.group_advantages, "policy_loss": iama_kernels.policy_loss}
    try:
        from iama.integrations.trl import IAMAGRPOTrainer

        known["IAMAGRPOTrainer"] = IAMAGRPOTrainer
    except ImportError:
        pass
    checked = set()
    for block in PYTHON_BLOCKS:
        for name, keywords in _keyword_calls(block):
            target = known.get(name)
            if target is None or not keywords:
                continue
            params = inspect.signature(target).parameters
            takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
            for keyword in keywords:
                if name == "IAMAGRPOTrainer" and keyword not in params:
                    params_trl = inspect.signature(IAMAGRPOTrainer.__mro__[1]).parameters
                    assert keyword in params_trl, f"{name} takes no {keyword!r}"
                else:
                    assert keyword in params or takes_any, f"{name} takes no {keyword!r}"
            checked.add(name)
    assert {"TrainerConfig", "NonLinearGRPOTrainer", "group_advantages"} <= checked


def test_the_verl_command_line_settings_parse() -> None:
    from iama.integrations.verl import settings_from_config

    block = next(b for b in BASH_BLOCKS if "algorithm.adv_estimator=iama" in b)
    section = {key: value for key, value in re.findall(r"\+algorithm\.iama\.(\w+)=(\S+)", block)}
    assert section == {"transform": "best_of_n", "n": "4"}
    settings = settings_from_config({**section, "n": int(section["n"])})  # Hydra parses 4 as an int
    assert repr(settings.transform) == "BestOfN(4)"


def test_the_verl_policy_loss_name_is_the_registered_one() -> None:
    from iama.integrations.verl_loss import POLICY_LOSS_NAME

    block = next(b for b in BASH_BLOCKS if "policy_loss.loss_mode=" in b)
    assert re.findall(r"policy_loss\.loss_mode=(\w+)", block) == [POLICY_LOSS_NAME]


def test_paths_make_targets_and_commands_exist() -> None:
    paths = set(re.findall(r"`((?:benchmarks|docs|iama|iama_kernels|csrc|tests)/[\w./-]+)`", README))
    paths |= set(re.findall(r"\b(benchmarks/[\w/]+\.py)\b", README))
    assert paths, "the README names no file"
    for path in sorted(paths):
        assert (REPO / path).exists(), f"README names {path}, which does not exist"
    makefile = (REPO / "Makefile").read_text()
    for target in set(re.findall(r"`make (\w+)`", README)) | {"demo", "test"}:
        assert re.search(rf"^{target}:", makefile, re.M), f"Makefile has no target {target!r}"
    from iama import cli

    parser = cli.build_parser()
    for command in set(re.findall(r"`iama ((?:demo \w+|info)[^`]*)`", README)):
        parser.parse_args(command.split())
