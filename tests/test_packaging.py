"""pyproject.toml declares what the package imports; licence and citation files are there."""

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Imported only inside optional branches for packages a user adds on purpose (documented where used).
OPTIONAL_NOT_DECLARED = {"open_clip", "ImageReward", "wandb", "tensorboard", "torch_tensorrt"}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(spec: str) -> str:
    return _normalise(re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0])


def test_every_third_party_import_is_declared():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {_requirement_name(r) for r in project["dependencies"]}
    declared |= {_requirement_name(r) for extra in project["optional-dependencies"].values() for r in extra}
    distributions = importlib.metadata.packages_distributions()
    missing = {}
    for path in (REPO / "legion").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "legion" or top in OPTIONAL_NOT_DECLARED:
                    continue
                dists = {_normalise(d) for d in distributions.get(top, [top])}
                if not dists & declared:
                    missing.setdefault(top, str(path.relative_to(REPO)))
    assert not missing, f"imported but not in pyproject.toml: {missing}"


def test_lock_and_ranges_agree_on_torch():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lock = dict(line.split("==") for line in (REPO / "requirements.txt").read_text().splitlines() if "==" in line)
    torch_range = next(r for r in project["dependencies"] if r.startswith("torch>"))
    low, high = re.findall(r"[\d.]+", torch_range)
    as_tuple = lambda v: tuple(int(p) for p in v.split("."))  # noqa: E731
    assert as_tuple(low) <= as_tuple(lock["torch"]) < as_tuple(high)  # the tested pin is inside the range


def test_licence_and_citation():
    licence = (REPO / "LICENSE").read_text()
    assert "Apache License" in licence and "Version 2.0" in licence and "END OF TERMS AND CONDITIONS" in licence
    citation = (REPO / "CITATION.cff").read_text()
    assert "cff-version:" in citation and "2503.15264" in citation and "license: Apache-2.0" in citation
