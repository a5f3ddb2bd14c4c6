"""Data-parallel training (issue 14) on the CPU: 2 gloo processes stand in for 2 GPUs.

speed.train on 2 ranks against 1 rank with the same global batch, a rank-0 checkpoint resumed on 2 ranks and
refused on 1, and train_tiny.py under torchrun. One spawn of 2 processes runs every 2-rank training of speed.train
(a module fixture); each process uses one intra-op thread.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import speed
import train_tiny

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS, STOP, BATCH = 6, 3, 8  # the stopped run ends at step STOP, in the second epoch of 16 images


def _model():
    torch.manual_seed(0)
    # dropout=0: with dropout each rank draws masks for its own share of the batch (from the same seed), so 2 ranks
    # cannot reproduce the masks of 1 rank drawing them for the whole batch
    return speed.UNet(img_res=8, ch=16, ch_mult=(1, 2), num_blocks=1, attn_res=(), dropout=0.0)


def _train(ckpt, strategy="speed", **kw):
    """A few fp32 steps of a tiny UNet on 16 8x8 images, global batch 8, in this process's group (if any)."""
    images = torch.from_numpy(np.random.RandomState(0).randint(0, 256, (16, 3, 8, 8), dtype=np.uint8))
    schedule = speed.make_schedule("linear")
    return speed.train(_model(), images, schedule, speed.make_strategy(strategy, schedule), steps=STEPS,
                       batch_size=BATCH, lr=1e-3, warmup=2, precision="fp32", device="cpu", log_every=2,
                       ckpt_path=str(ckpt), progress=False, **kw)


def _two_ranks(rank, folder):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    try:
        _train(f"{folder}/whole.pt")                                                 # uninterrupted
        _train(f"{folder}/cut.pt", callback=lambda r: r.step == STOP, callback_every=1)  # rank 0 stops it at STOP
        if rank == 0:
            shutil.copy(f"{folder}/cut.pt", f"{folder}/stopped.pt")
        dist.barrier()
        _train(f"{folder}/cut.pt", resume=True)                                      # resumed on 2 ranks
        _train(f"{folder}/loss_aware.pt", strategy="loss_aware")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Checkpoints of the 2-rank runs (whole, stopped, cut = stopped then resumed) and of a 1-rank run."""
    folder = tmp_path_factory.mktemp("ddp")
    mp.spawn(_two_ranks, args=(str(folder),), nprocs=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train(folder / "one.pt")
        _train(folder / "loss_aware_one.pt", strategy="loss_aware")
    finally:
        torch.set_num_threads(threads)
    names = ("one", "whole", "stopped", "cut", "loss_aware", "loss_aware_one")
    return {name: torch.load(folder / f"{name}.pt", weights_only=True) for name in names}


def test_two_ranks_give_the_weights_of_one_rank(runs):
    one, two = runs["one"], runs["whole"]
    assert one["step"] == two["step"] == STEPS and two["experiment"]["world_size"] == 2
    for key in ("model", "ema"):
        for name, w in one[key].items():
            torch.testing.assert_close(two[key][name], w, rtol=0, atol=1e-5, msg=f"{key} {name}")
    assert max(float((one["model"][k] - v).abs().max()) for k, v in _model().state_dict().items()) > 1e-3  # it trained
    losses = [h["loss"] for h in one["history"]], [h["loss"] for h in two["history"]]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)  # the logged loss is averaged over the ranks


def test_loss_aware_records_the_whole_batch_on_every_rank(runs):
    """Each rank gathers the whole batch's losses before updating the loss-aware history, so 2 ranks keep the state
    of 1 rank (and every rank the same state: rank 0's is the one checkpointed)."""
    one, two = runs["loss_aware_one"]["strategy"], runs["loss_aware"]["strategy"]
    assert int(one["counts"].sum()) == STEPS * BATCH and torch.equal(two["counts"], one["counts"])
    torch.testing.assert_close(two["losses"], one["losses"], rtol=1e-5, atol=1e-6)


def test_rank0_checkpoint_resumes_on_two_ranks(runs):
    stopped, cut, whole = runs["stopped"], runs["cut"], runs["whole"]
    assert stopped["step"] == STOP and cut["step"] == whole["step"] == STEPS
    for key in ("model", "ema"):
        assert all(torch.equal(cut[key][k], v) for k, v in whole[key].items()), key
    for i, state in whole["opt"]["state"].items():
        assert all(torch.equal(cut["opt"]["state"][i][k], v) for k, v in state.items())


def test_resume_on_another_number_of_ranks_names_world_size(runs, tmp_path):
    torch.save(runs["stopped"], tmp_path / "stopped.pt")
    with pytest.raises(ValueError, match=r"another experiment.*world_size: 2 there, 1 now"):
        _train(tmp_path / "stopped.pt", resume=True)


def test_batch_not_divisible_by_the_ranks_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert train_tiny.main(["--preset", "cpu", "--batch-size", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train_tiny: --batch-size 3: ") and "multiple of 2" in err[0]
    assert os.listdir(tmp_path) == []


def test_train_tiny_under_torchrun(tmp_path):
    from test_train_tiny import FakeGeneric, _images, _script, _write_zip
    data, fdnet = _write_zip(tmp_path / "tiny.zip", _images(16)), _script(FakeGeneric(), tmp_path / "fdnet.pt")
    out = tmp_path / "run"

    def torchrun(*extra):
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                os.path.join(HERE, "train_tiny.py"), "--preset", "cpu", "--data", data, "--cache",
                str(tmp_path / "cache"), "--out", str(out), "--quiet", "--batch-size", "4", "--evals", "2",
                "--fid-model", fdnet, "--eval-samplers", "ddim2", "--eval-samples", "8", *extra]
        return subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": HERE})

    first = torchrun("--steps", "2")
    assert first.returncode == 0, first.stderr
    lines = first.stdout.strip().splitlines()
    assert sum(line.startswith("train_tiny: preset cpu") for line in lines) == 1
    assert sum(line.startswith("train_tiny: outputs in") for line in lines) == 1  # rank 0 alone prints and writes
    assert sum("step 2: FD-fdnet ddim2" in line for line in lines) == 1
    m = json.loads((out / "metrics.json").read_text())
    assert m["finished"] and m["steps"] == 2 and m["metric"] == "FD-fdnet" and [s for s, _ in m["evals"]["ddim2"]] == [1, 2]
    assert (out / "samples.png").exists() and sorted(os.listdir(out)) == ["ckpt.pt", "metrics.json", "samples.png"]
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["step"] == 2 and ck["experiment"]["world_size"] == 2 and ck["experiment"]["metric"].startswith("fdnet.pt:")
    more = torchrun("--steps", "4", "--resume")  # every rank checks rank 0's experiment (with its feature net)
    assert more.returncode == 0, more.stderr
    assert json.loads((out / "metrics.json").read_text())["steps"] == 4
