"""The package's layers: data flows one way (probes -> step read -> detectors -> responder ->
sinks), and no module imports one from a layer above its own. Only ``stabmon/callbacks`` imports
Lightning, and only ``stabmon/integrations/<framework>.py`` its framework."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "stabmon"

# Lowest first. A module may import its own layer and those below it.
LAYERS = [
    ("stabmon._validation", "stabmon._failsoft", "stabmon.distributed", "stabmon.keys", "stabmon.signals",
     "stabmon.report", "stabmon.memory"),
    ("stabmon.kernels", "stabmon.curvature"),
    ("stabmon.probes",),
    ("stabmon.detectors",),
    ("stabmon.interventions", "stabmon.forensics"),
    ("stabmon.alerts", "stabmon.sinks"),
    ("stabmon.settings",),
    ("stabmon.core", "stabmon.emission"),
    ("stabmon.adapter",),
    ("stabmon.callbacks", "stabmon.integrations", "stabmon.cli", "stabmon.__init__", "stabmon.__main__",
     "stabmon.data"),
]


def layer_of(module: str) -> int:
    for rank, names in enumerate(LAYERS):
        if any(module == name or module.startswith(name + ".") for name in names):
            return rank
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def modules():
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 2 else parts)
        yield name if name != "stabmon" else "stabmon.__init__", path


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


@pytest.mark.parametrize("module, path", list(modules()), ids=[m for m, _ in modules()])
def test_no_module_imports_from_a_layer_above_its_own(module, path):
    mine = layer_of(module)
    above = sorted(name for name in imports(path)
                   if name.startswith("stabmon") and name != "stabmon" and layer_of(name) > mine)
    assert not above, f"{module} (layer {mine}) imports {above} from above"
    frameworks = {name.split(".")[0] for name in imports(path)} & {"pytorch_lightning", "lightning", "transformers"}
    if frameworks:
        assert module.startswith(("stabmon.callbacks", "stabmon.integrations")), (module, frameworks)


def test_modules_stay_small_enough_to_read():
    sizes = {module: len(path.read_text().splitlines()) for module, path in modules()}
    assert sizes["stabmon.core"] < 300
    assert not {m: n for m, n in sizes.items() if n > 400}
