"""The skip list: written when a batch is skipped, kept in checkpoints, and a restart given it
never trains on the listed rows again; the data-side filter; Lightning's skip_batches.json."""

import copy
import json

import pytest
import torch
from torch.utils.data import IterableDataset

from stabmon.data import item_fingerprint, without_rows
from stabmon.forensics import SkipList
from tests.forensics.loop import POISON_STEP, batches, make, train


def _state(model, opt, core):
    return copy.deepcopy((model.state_dict(), opt.state_dict(), core.state_dict()))


def test_a_restart_with_the_skip_list_skips_the_poisoned_batch(tmp_path):
    stream = list(batches(POISON_STEP + 10))
    model, opt, core = make(run_dir=tmp_path / "first")
    train(model, opt, core, iter(stream[:POISON_STEP - 10]))
    checkpoint = _state(model, opt, core)  # written before the spike
    train(model, opt, core, iter(stream[POISON_STEP - 10:]))
    skip_file = tmp_path / "first" / "stabmon-skip.json"
    assert len(json.loads(skip_file.read_text())["entries"]) == 1

    def restart(**kwargs):
        model, opt, core = make(**kwargs)
        model_state, opt_state, core_state = copy.deepcopy(checkpoint)
        model.load_state_dict(model_state)
        opt.load_state_dict(opt_state)
        core.load_state_dict(core_state)
        train(model, opt, core, iter(stream[POISON_STEP - 10:]))
        return core

    listed = restart(skip_list=skip_file, run_dir=tmp_path / "second")
    assert not [f for f in listed.findings if f.step == POISON_STEP]  # no spike: the batch never counted
    assert [(a.step, a.name, a.detail) for a in listed.actions_taken] == [
        (POISON_STEP, "skip_step", "the batch holds a row of the skip list")]
    again = restart()  # without the list, the same batch spikes again
    assert any(f.step == POISON_STEP and f.severity == "critical" for f in again.findings)
    assert ("skip_step", POISON_STEP) in {(a.name, a.step) for a in again.actions_taken}


def test_the_skip_list_travels_in_the_monitors_state(tmp_path):
    model, opt, core = make()
    train(model, opt, core, batches(POISON_STEP + 2))
    state = core.state_dict()
    assert len(state["forensics"]["skip_list"]) == 1 and state["forensics"]["records"][0]["step"] == POISON_STEP
    _, _, resumed = make()
    resumed.load_state_dict(state)
    assert len(resumed.responder.forensics.skip_list) == 1 and len(resumed.forensics) == 1
    torch.save(state, tmp_path / "state.pt")  # primitives only: a checkpoint loads it with weights_only
    assert torch.load(tmp_path / "state.pt", weights_only=True)["forensics"] == state["forensics"]


def test_without_rows_drops_listed_items_from_map_and_iterable_datasets():
    data = [(torch.full((4,), i), i % 3) for i in range(10)]
    skips = SkipList()
    skips.add([{"fingerprint": item_fingerprint(data[3]), "reason": "spike"},
               {"fingerprint": None, "index": 7, "reason": "dataset index"}])
    kept = without_rows(data, skips)
    assert [int(x[0][0]) for x in kept] == [0, 1, 2, 4, 5, 6, 8, 9]

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(data)

    assert [int(x[0][0]) for x in without_rows(Stream(), skips)] == [0, 1, 2, 4, 5, 6, 7, 8, 9]


def test_an_item_has_the_fingerprint_of_its_row_in_a_batch():
    from torch.utils.data import DataLoader

    from stabmon.forensics.batch import fingerprint_hex, row_fingerprints

    data = [{"input_ids": torch.arange(i, i + 6), "labels": torch.arange(i, i + 6)} for i in range(5)]
    batch = next(iter(DataLoader(data, batch_size=5)))
    assert [fingerprint_hex(int(x)) for x in row_fingerprints(batch)] == [item_fingerprint(d) for d in data]


def test_lightnings_skip_batches_json_is_read(tmp_path):
    path = tmp_path / "skip_batches.json"
    path.write_text(json.dumps([11, 12]))
    skips = SkipList(path)
    assert skips.holds(None, epoch=0, batch_index=12) and not skips.holds(None, epoch=0, batch_index=13)
    for bad, match in ((tmp_path / "none.json", "no such file"), (path.with_name("x.json"), "neither")):
        if bad.name == "x.json":
            bad.write_text(json.dumps({"rows": []}))
        with pytest.raises(ValueError, match=match):
            SkipList(bad)
