import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_import_stabmon_does_not_import_lightning_or_triton():
    code = (
        "import sys, stabmon, stabmon.kernels, stabmon.probes, stabmon.core; "
        "bad = {'pytorch_lightning', 'lightning', 'triton', 'wandb'} & set(sys.modules); "
        "assert not bad, bad; "
        "stabmon.StabilityMonitor; assert 'pytorch_lightning' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_only_callbacks_import_lightning_in_either_spelling():
    pattern = re.compile(r"^\s*(import|from) (pytorch_lightning|lightning)\b|\(\"(pytorch_lightning|lightning)", re.MULTILINE)
    for path in (ROOT / "stabmon").rglob("*.py"):
        if "callbacks" not in path.parts:
            assert not pattern.search(path.read_text()), path
    assert pattern.search((ROOT / "stabmon" / "callbacks" / "_lightning.py").read_text())  # the pattern does match


def test_monitor_never_uses_the_global_rng():
    pattern = re.compile(r"torch\.(randn|rand|randint|randperm|normal|bernoulli)\((?![^)]*generator=)|(?<![\w.])random\.|np\.random")
    for path in (ROOT / "stabmon").rglob("*.py"):
        for line in path.read_text().splitlines():
            code = line.split("#")[0]
            assert not pattern.search(code) or ">>>" in line, f"{path}: {line.strip()}"
