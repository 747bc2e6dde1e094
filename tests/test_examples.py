"""Every ``examples/*.py`` runs with small settings, so the examples never rot.

Each example exposes ``main(argv) -> run_dir``. A new example must add its small-settings argv to ``SMALL``
(``{out}`` is replaced by a fresh directory): the test of an example missing from the table fails.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import warnings
from pathlib import Path

import pytest

from tests.conftest import read_records

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

SMALL: dict[str, list[str]] = {
    "plain_loop": ["--steps", "20", "--every", "10", "--out", "{out}"],
    "hf_trainer": ["--steps", "4", "--every", "2", "--out", "{out}"],
    "lightning_module": ["--steps", "4", "--every", "2", "--out", "{out}"],
    "accelerate_loop": ["--steps", "4", "--every", "2", "--out", "{out}"],
}


def _examples() -> list[str]:
    return sorted(p.stem for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"heavytail_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _reset_accelerate() -> None:
    """Accelerate keeps process-wide singletons: an example's settings must not leak into the next one."""
    if "accelerate.state" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(True)
        GradientState._reset_state()


@pytest.fixture
def quiet():
    for name in ("transformers", "accelerate", "lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    _reset_accelerate()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    _reset_accelerate()


def test_examples_are_found():
    assert "plain_loop" in _examples()


@pytest.mark.parametrize("name", _examples())
def test_example_runs_with_small_settings(name, tmp_path, quiet):
    if name not in SMALL:
        pytest.fail(f"examples/{name}.py has no small-settings argv: add it to SMALL in tests/test_examples.py")
    module = _load(name)
    assert callable(getattr(module, "main", None)), f"examples/{name}.py must define main(argv) -> run_dir"
    out = tmp_path / name
    argv = [arg.replace("{out}", str(out)) for arg in SMALL[name]]
    run_dir = Path(module.main(argv))
    assert run_dir.is_dir()
    runs = sorted(run_dir.rglob("metrics.jsonl"))
    assert runs, f"examples/{name}.py wrote no metrics.jsonl under {run_dir}"
    for path in runs:
        assert read_records(path.parent), f"{path} holds no record"
        assert (path.parent / "meta.json").is_file()
