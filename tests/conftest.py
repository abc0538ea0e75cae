import logging
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors through the interpreter; must be set before they are defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")


TORCH_CONFIGS = {"torch._inductor.config": torch._inductor.config, "torch._dynamo.config": torch._dynamo.config}
WRITTEN_BY_TORCH = {"aot_inductor.metadata"}  # AOTInductor's packaging records its own metadata there


def changed_options(before: dict, after: dict) -> list[str]:
    """The options whose presence or value differs between two ``get_config_copy()`` snapshots."""
    def changed(name: str) -> bool:
        if name not in before or name not in after:
            return True
        return name not in WRITTEN_BY_TORCH and after[name] is not before[name] and after[name] != before[name]

    return sorted(filter(changed, before.keys() | after.keys()))


@pytest.fixture(autouse=True)
def torch_config_left_as_found():
    """Every test leaves torch's compiler configuration as it found it: tests change it only with
    ``config.patch(...)``. (``monkeypatch.setattr`` on a config module is undone with a ``delattr``
    by some pytest versions, which deletes the option for every later compile in the process.)"""
    before = {name: module.get_config_copy() for name, module in TORCH_CONFIGS.items()}
    yield
    for name, module in TORCH_CONFIGS.items():
        changed = changed_options(before[name], module.get_config_copy())
        assert not changed, f"the test left {name} changed: {changed}"


@pytest.fixture(autouse=True)
def package_log_levels_restored():
    """The command-line entry points a test runs set the package's log levels (the eval CLI quiets
    the rewrite's logger): each test gets them back as they were, so a later test's ``caplog`` sees
    the records it expects whatever ran before it."""
    def package_loggers():
        return [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
                if name.split(".")[0] == "retro_compile"]

    levels = {logger.name: logger.level for logger in package_loggers()}
    yield
    for logger in package_loggers():
        logger.setLevel(levels.get(logger.name, logging.NOTSET))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles from scratch: no cache entries or recompile counts leak between tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


logging.getLogger("retro_compile").setLevel(logging.INFO)
