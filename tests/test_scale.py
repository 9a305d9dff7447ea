"""Statistics files, merging, checkpoint/resume (SIGKILL), distributed scoring (gloo), hostile input."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import hsvfast
from hsvfast.distributed import ShardSampler
from tiny_models import random_batches, tiny_model

TESTS = Path(__file__).resolve().parent


def assert_same_report(a, b, rtol=1e-9):
    assert a.layers == b.layers and a.num_examples == b.num_examples
    assert {str(k): v for k, v in a.class_counts.items()} == {str(k): v for k, v in b.class_counts.items()}
    for name in a.metrics:
        np.testing.assert_allclose(a.metrics[name], b.metrics[name], rtol=rtol, err_msg=name)


# ---------------------------------------------------------------------------------- files and merge


def test_save_load_round_trip(tmp_path):
    report = hsvfast.score(tiny_model("bert"), random_batches())
    report.stats.save(tmp_path / "s.safetensors")
    loaded = hsvfast.load_statistics(tmp_path / "s.safetensors")
    again = hsvfast.report_from(loaded)
    assert_same_report(report, again, rtol=1e-12)
    assert again.pooling == "mean" and again.num_blocks == 4 and loaded.info["model_class"] == "BertModel"


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_files_get_the_permissions_of_any_file_the_user_writes(tmp_path, umask):
    stats = hsvfast.score(tiny_model("bert"), random_batches(num_batches=2)).stats
    previous = os.umask(umask)
    try:
        stats.save(tmp_path / "s.safetensors")
        stats.save(tmp_path / "s.safetensors")  # and when it replaces an earlier save
    finally:
        os.umask(previous)
    assert (tmp_path / "s.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]  # no temporary file left behind


def test_damaged_files_are_refused(tmp_path):
    hsvfast.score(tiny_model("bert"), random_batches()).stats.save(tmp_path / "s.safetensors")
    data = bytearray((tmp_path / "s.safetensors").read_bytes())
    flipped = bytearray(data)
    flipped[-100] ^= 0xFF
    (tmp_path / "flipped.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="corrupted: its tensors do not match"):
        hsvfast.load_statistics(tmp_path / "flipped.safetensors")
    (tmp_path / "short.safetensors").write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ValueError, match="truncated or corrupted"):
        hsvfast.load_statistics(tmp_path / "short.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not hsvfast statistics"):
        hsvfast.load_statistics(tmp_path / "other.safetensors")


def test_merge_of_parts_equals_the_whole(tmp_path):
    model, batches = tiny_model("bert"), random_batches(num_batches=6)
    whole = hsvfast.score(model, batches)
    for k in range(3):
        hsvfast.score(model, batches[k::3]).stats.save(tmp_path / f"part{k}.safetensors")
    paths = [tmp_path / f"part{k}.safetensors" for k in (2, 0, 1)]
    assert_same_report(whole, hsvfast.report_from(hsvfast.merge(paths)))
    first = hsvfast.load_statistics(paths[0])
    before = first.num_examples
    hsvfast.merge([first, paths[1]])
    assert first.num_examples == before  # inputs untouched


def test_merge_refuses_incompatible_parts(tmp_path):
    model, batches = tiny_model("bert"), random_batches()
    mean = hsvfast.score(model, batches).stats
    with pytest.raises(ValueError, match="different pooling: 'mean' vs 'mean_all'"):
        hsvfast.merge([mean, hsvfast.score(model, batches, pooling="mean_all").stats])
    with pytest.raises(ValueError, match="layers"):
        hsvfast.merge([mean, hsvfast.score(model, batches, layers=[0, 1]).stats])
    with pytest.raises(ValueError, match="different model_name: 'BertModel' vs 'LlamaModel'"):
        hsvfast.merge([mean, hsvfast.score(tiny_model("llama"), batches).stats])
    mean.save(tmp_path / "a.safetensors")
    (tmp_path / "b.safetensors").write_bytes((tmp_path / "a.safetensors").read_bytes())
    for twice in ([tmp_path / "a.safetensors"] * 2, [tmp_path / "a.safetensors", tmp_path / "b.safetensors"],
                  [mean, tmp_path / "b.safetensors"]):
        with pytest.raises(ValueError, match="hold identical statistics .*one part given twice"):
            hsvfast.merge(twice)


def test_merge_refuses_a_different_label_mapping():
    model, batches = tiny_model("bert"), random_batches()
    named = [{**b, "labels": [["a", "b", "c"][i] for i in b["labels"].tolist()]} for b in batches]
    with pytest.raises(ValueError, match="different label mappings"):
        hsvfast.merge([hsvfast.score(model, batches).stats, hsvfast.score(model, named).stats])


def test_all_padding_sequences_are_skipped():
    batches = random_batches(num_batches=1)
    batches[0]["attention_mask"][2] = 0
    with pytest.warns(UserWarning, match="no token to pool"):
        report = hsvfast.score(tiny_model("bert"), batches)
    assert report.num_skipped == 1 and report.num_examples == 11


def test_cli_merge_and_report(tmp_path):
    from hsvfast import cli

    model, batches = tiny_model("bert"), random_batches(num_batches=4)
    whole = hsvfast.score(model, batches)
    for k in range(2):
        hsvfast.score(model, batches[k::2]).stats.save(tmp_path / f"p{k}.safetensors")
    assert cli.main(["merge", str(tmp_path / "p0.safetensors"), str(tmp_path / "p1.safetensors"),
                     "-o", str(tmp_path / "all.safetensors"), "--report", str(tmp_path / "all.json")]) == 0
    merged = hsvfast.Report.from_dict(json.loads((tmp_path / "all.json").read_text()))
    for name in whole.metrics:
        np.testing.assert_allclose(merged.metrics[name], whole.metrics[name], rtol=1e-9)
    assert cli.main(["merge", str(tmp_path / "p0.safetensors"), str(tmp_path / "nope.safetensors"),
                     "-o", str(tmp_path / "x.safetensors")]) == 2


# ------------------------------------------------------------------------------ checkpoint and resume

SCRIPT = """
import json, os, signal, sys
sys.path.insert(0, {tests!r})
import hsvfast
from tiny_models import random_batches, tiny_model
batches = random_batches(num_batches=10)
kill_at = int(os.environ.get("KILL_AT", "-1"))

class Loader:
    def __len__(self):
        return len(batches)
    def __iter__(self):
        for i, b in enumerate(batches):
            if i == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            yield b

report = hsvfast.score(tiny_model("bert"), Loader(), checkpoint={ckpt!r}, checkpoint_every=3)
print(json.dumps(report.to_dict()))
"""


def test_sigkill_then_resume_gives_the_uninterrupted_report(tmp_path):
    ckpt = tmp_path / "run.ckpt"
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=str(TESTS), ckpt=str(ckpt)))
    killed = subprocess.run([sys.executable, str(script)], env={**os.environ, "KILL_AT": "7"},
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL
    _, extra = hsvfast.load_statistics(ckpt, with_extra=True)
    assert extra["batches_done"] == 6  # the last checkpoint before the kill
    resumed = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    report = hsvfast.Report.from_dict(json.loads(resumed.stdout.strip().splitlines()[-1]))
    uninterrupted = hsvfast.score(tiny_model("bert"), random_batches(num_batches=10))
    for name in uninterrupted.metrics:
        np.testing.assert_allclose(report.metrics[name], uninterrupted.metrics[name], rtol=1e-9)
    assert report.num_examples == uninterrupted.num_examples == 120


def test_checkpoint_of_another_run_or_other_data_is_refused(tmp_path):
    ckpt = tmp_path / "c.ckpt"
    model, batches = tiny_model("bert"), random_batches(num_batches=4)
    hsvfast.score(model, batches, checkpoint=ckpt, checkpoint_every=1)
    with pytest.raises(ValueError, match="different run .*layers"):
        hsvfast.score(model, batches, layers=[0], checkpoint=ckpt)
    with pytest.raises(ValueError, match="loader yields different data"):
        hsvfast.score(model, random_batches(num_batches=4, seed=9), checkpoint=ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:200])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        hsvfast.score(model, batches, checkpoint=ckpt)
    with pytest.raises(ValueError, match="checkpoint .* is a folder: pass a file name in it"):  # was "does not exist"
        hsvfast.score(model, batches, checkpoint=tmp_path)
    for every in (0, True, 2.5):
        with pytest.raises(ValueError, match="checkpoint_every must be a positive number of batches"):
            hsvfast.score(model, batches, checkpoint=tmp_path / "d.ckpt", checkpoint_every=every)


def test_loader_failing_midway_leaves_a_valid_checkpoint(tmp_path):
    ckpt = tmp_path / "c.ckpt"
    model, batches = tiny_model("bert"), random_batches(num_batches=6)

    def failing():
        for i, b in enumerate(batches):
            if i == 4:
                raise OSError("disk went away")
            yield b

    with pytest.raises(OSError, match="disk went away"):
        hsvfast.score(model, failing(), checkpoint=ckpt, checkpoint_every=2)
    assert hsvfast.load_statistics(ckpt, with_extra=True)[1]["batches_done"] == 4
    resumed = hsvfast.score(model, batches, checkpoint=ckpt, checkpoint_every=2)
    assert_same_report(resumed, hsvfast.score(model, batches))


# ------------------------------------------------------------------------------------- distributed


def test_two_gloo_processes_give_the_single_process_report(tmp_path):
    import torch.multiprocessing as mp

    from distributed_worker import score_shard

    mp.spawn(score_shard, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    batches = random_batches(num_batches=5)
    batches[3]["labels"][:] = 7
    single = hsvfast.score(tiny_model("bert"), batches)
    for rank in range(2):
        report = hsvfast.Report.from_dict(json.loads((tmp_path / f"rank{rank}.json").read_text()))
        assert report.num_examples == 60 and report.class_counts["7"] == 12
        for name in single.metrics:
            np.testing.assert_allclose(report.metrics[name], single.metrics[name], rtol=1e-9)
    assert (tmp_path / "ckpt.rank0").exists() and (tmp_path / "ckpt.rank1").exists()


def test_two_gloo_processes_count_the_batchers_classes_together(tmp_path):
    """Class 3 lives in rank 1's shard only: both ranks must still choose class-balanced statistics
    with the counts of the whole corpus, and report what one process reports."""
    import torch.multiprocessing as mp

    from distributed_worker import build_double_bert, score_batcher_shard
    from hsvfast.batching import BucketedBatches
    from tiny_models import tiny_corpus, tiny_tokenizer

    mp.spawn(score_batcher_shard, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    texts, labels = tiny_corpus()
    with pytest.warns(UserWarning, match="skipping"):
        single = hsvfast.score(build_double_bert(), BucketedBatches(texts, labels, tiny_tokenizer(), batch_size=8))
    assert single.stats.mode == "per_class"
    for rank in range(2):
        saved = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert saved.pop("mode") == "balanced"
        report = hsvfast.Report.from_dict(saved)
        assert report.num_examples == 40 and report.num_skipped == 2 and report.class_counts["3"] == 5
        for name in single.metrics:
            np.testing.assert_allclose(report.metrics[name], single.metrics[name], rtol=1e-9)


@pytest.mark.parametrize("size,world", [(10, 3), (7, 2), (2, 4), (0, 2)])
def test_shard_sampler_neither_drops_nor_duplicates(size, world):
    parts = [list(ShardSampler(size, rank, world)) for rank in range(world)]
    assert sorted(i for part in parts for i in part) == list(range(size))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert [len(ShardSampler(size, r, world)) for r in range(world)] == list(map(len, parts))


# ---------------------------------------------------------------------------------- hostile inputs


def test_sparse_negative_ids_one_example_class_and_batch_of_one():
    model = tiny_model("bert")
    batches = random_batches(num_batches=3)
    for b in batches:
        b["labels"] = torch.where(b["labels"] == 0, torch.tensor(-5), b["labels"] * 17)
    single = {k: v[:1].clone() for k, v in batches[0].items()}
    single["labels"][:] = 99  # a class with one example, in a batch of size 1
    with pytest.warns(UserWarning, match=r"1 class\(es\) have a single example \(99\)"):
        report = hsvfast.score(model, batches + [single])
    assert report.class_counts[99] == 1 and set(report.class_counts) == {-5, 17, 34, 99}
    assert all(np.isfinite(report.metrics["variability"]))


def test_inputs_longer_than_the_model_takes():
    batches = random_batches(num_batches=1)
    batches[0] = {k: (v.repeat(1, 8) if v.dim() == 2 else v) for k, v in batches[0].items()}
    with pytest.raises(ValueError, match="at most 64; tokenize with truncation=True, max_length=64"):
        hsvfast.score(tiny_model("bert"), batches)


def test_out_of_memory_message_suggests_a_smaller_batch(monkeypatch):
    model = tiny_model("bert")

    def explode(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(model, "forward", explode)
    with pytest.raises(torch.cuda.OutOfMemoryError, match="smaller batch size"):
        hsvfast.score(model, random_batches(num_batches=1))


def test_float16_overflow_is_named():
    try:
        torch.nn.functional.layer_norm(torch.ones(2, 4, dtype=torch.float16), (4,))
    except RuntimeError as error:  # torch before ~2.2 has no float16 LayerNorm on the CPU
        pytest.skip(f"torch {torch.__version__} cannot run a float16 BERT on the CPU: {error}")
    model = tiny_model("bert")
    with torch.no_grad():
        model.encoder.layer[0].output.dense.weight.mul_(1e7)  # outputs past float16 max (65504)
    with pytest.raises(ValueError, match="layer 0: non-finite.*float16, activations can overflow"):
        hsvfast.score(model.half(), random_batches(num_batches=1))
