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


def test_only_callbacks_import_lightning_and_never_as_lightning_pytorch():
    for path in (ROOT / "stabmon").rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(import lightning|from lightning)\b", text, re.M), path
        if "callbacks" not in path.parts:
            assert not re.search(r"^\s*(import|from) pytorch_lightning", text, re.M), path


def test_monitor_never_uses_the_global_rng():
    pattern = re.compile(r"torch\.(randn|rand|randint|randperm|normal|bernoulli)\((?![^)]*generator=)|(?<![\w.])random\.|np\.random")
    for path in (ROOT / "stabmon").rglob("*.py"):
        for line in path.read_text().splitlines():
            code = line.split("#")[0]
            assert not pattern.search(code) or ">>>" in line, f"{path}: {line.strip()}"
