"""The forensics under 2-rank DDP with the poisoned row on one rank only: every rank takes part,
the record names the rank and the row, and every rank writes down the same record and takes the
same decision."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.forensics.loop import POISON_ROW, POISON_STEP

pytestmark = [pytest.mark.ddp, pytest.mark.slow]


def test_the_poisoned_row_on_rank_1_is_found_by_every_rank(tmp_path):
    env = {**os.environ, "STABMON_STRICT": "1", "PYTHONWARNINGS": "ignore"}
    script = Path(__file__).with_name("ddp_forensics.py")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["records"] == rank1["records"] and rank0["actions"] == rank1["actions"]
    assert rank0["weights"] == rank1["weights"] and rank0["disabled"] == []
    (record,) = rank0["records"]
    top = record["rows"][0]
    assert (record["step"], top["rank"], top["position"]) == (POISON_STEP, 1, POISON_ROW)
    assert record["verdict"] == "reproducible" and record["world_size"] == 2 and top["loss_share"] > 0.9
    assert [(a["step"], a["name"]) for a in rank0["actions"]] == [(POISON_STEP, "skip_step")]
    assert [e["fingerprint"] for e in rank0["skip_list"]] == [top["fingerprint"]] == \
           [e["fingerprint"] for e in rank1["skip_list"]]
    written = json.loads((tmp_path / "stabmon-skip.json").read_text())["entries"]
    assert [e["rank"] for e in written] == [1]
    assert (tmp_path / "stabmon-forensics" / f"step_{POISON_STEP}.json").is_file()
