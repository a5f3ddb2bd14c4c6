"""Tests of train_tiny.py (data, feature nets, one run, the command line) and the bench/ scripts.

Runs use a small generated dataset (8x8 images) and the micro UNet, so each takes seconds on a CPU; the
tests of the real Inception network and the shared data skip where ../shared is absent. No test
touches the network: downloads go to file:// URLs or are blocked.
"""
import argparse
import collections
import glob
import hashlib
import io
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile

import numpy as np
import pytest
import torch
import torch.nn as nn

import speed
import train_tiny

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "bench"))
import compare  # noqa: E402

SHARED_INCEPTION = os.path.join(HERE, "..", "shared", "inception", "inception-fid-fp16.pt")
needs_inception = pytest.mark.skipif(not os.path.exists(SHARED_INCEPTION), reason=f"needs {SHARED_INCEPTION}")
TRAIN_TINY = os.path.join(HERE, "train_tiny.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": HERE}


def _images(n, res=8, seed=0):
    return torch.from_numpy(np.random.RandomState(seed).randint(0, 256, (n, 3, res, res), dtype=np.uint8))


def _png(img):
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return buf.getvalue()


def _write_zip(path, images, labels=None):
    names = [f"{i:05d}.png" for i in range(len(images))]
    with zipfile.ZipFile(path, "w") as z:
        for name, img in zip(names, images):
            z.writestr(name, _png(img))
        if labels is not None:
            z.writestr("dataset.json", json.dumps({"labels": [[n, int(c)] for n, c in zip(names, labels)]}))
    return str(path)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from a second thread, and spin-waiting threads slow a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A 16-image 8x8 dataset zip with two classes, and one --cache shared by the runs of this module."""
    d = tmp_path_factory.mktemp("data")
    return dict(zip=_write_zip(d / "tiny.zip", _images(16), torch.arange(16) % 2), cache=str(d / "cache"))


def _argv(data, out, *extra):
    return ["--preset", "cpu", "--data", data["zip"], "--cache", data["cache"], "--out", str(out), "--quiet",
            "--batch-size", "2", "--fid-model", "none", *extra]


def _weights(out):
    return torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", weights_only=True)["model"]


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- data ----------------------------------------------------------------------------------------

def test_load_zip_folder_and_cache(tmp_path, monkeypatch):
    imgs = _images(5)
    z = _write_zip(tmp_path / "d.zip", imgs, [3, 1, 4, 1, 5])
    got, labels = train_tiny.read_images(z)
    assert torch.equal(got, imgs) and labels.tolist() == [3, 1, 4, 1, 5]
    assert train_tiny.read_images(z, limit=2)[0].shape == (2, 3, 8, 8)
    folder = tmp_path / "f" / "sub"
    folder.mkdir(parents=True)
    for i, img in enumerate(imgs):
        (folder / f"{i}.png").write_bytes(_png(img))
    assert torch.equal(train_tiny.read_images(str(tmp_path / "f"))[0], imgs)
    cache = tmp_path / "cache"
    first = train_tiny.load_data(z, str(cache), limit=3)
    monkeypatch.setattr(train_tiny, "read_images", lambda *a: 1 / 0)  # the second call reads the cache
    assert torch.equal(train_tiny.load_data(z, str(cache), limit=3)[0], first[0])


def test_images_decoded_in_worker_processes_keep_their_order_and_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(train_tiny, "DECODE_CHUNK", 2)  # 7 images: 4 chunks, each decoded in a forked process
    imgs = _images(7, seed=1)
    assert torch.equal(train_tiny.read_images(_write_zip(tmp_path / "d.zip", imgs))[0], imgs)
    folder = tmp_path / "f"
    folder.mkdir()
    for i, img in enumerate(imgs):
        (folder / f"{i}.png").write_bytes(_png(img) if i != 5 else b"not an image")
    with pytest.raises(train_tiny.DataError, match=r"could not decode image .*5\.png"):  # a worker's, named
        train_tiny.read_images(str(folder))


def test_data_errors(tmp_path, monkeypatch):
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(train_tiny.DataError, match="could not read"):
        train_tiny.load_data(str(tmp_path / "bad.zip"), str(tmp_path / "cache"))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.png").write_bytes(_png(_images(1)[0]))
    (mixed / "b.png").write_bytes(_png(_images(1, res=4)[0]))
    with pytest.raises(train_tiny.DataError, match="different sizes"):
        train_tiny.read_images(str(mixed))
    (tmp_path / "empty").mkdir()
    with pytest.raises(train_tiny.DataError, match="holds no images"):
        train_tiny.load_data(str(tmp_path / "empty"), str(tmp_path / "cache"))
    assert not (tmp_path / "cache").exists()  # nothing cached from failed reads
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: (_ for _ in ()).throw(urllib.error.URLError("x")))
    with pytest.raises(train_tiny.DataError, match="without internet pass --data"):
        train_tiny.load_data(None, str(tmp_path / "c3" / "data"))
    assert not (tmp_path / "c3").exists()  # a failed download leaves no folder behind


def test_balanced_subset_is_fixed_and_balanced():
    labels = torch.tensor([0, 0, 1, 2, 1, 0, 2, 1, 2, 2, 0, 1])
    idx = train_tiny.balanced_subset(labels, 7)
    assert idx.tolist() == [0, 1, 2, 3, 4, 5, 6]  # 3 of class 0, 2 of class 1, 2 of class 2, in dataset order
    assert torch.bincount(labels[train_tiny.balanced_subset(labels, 6)]).tolist() == [2, 2, 2]
    with pytest.raises(train_tiny.DataError, match="balanced"):
        train_tiny.balanced_subset(labels, 13)
    with pytest.raises(train_tiny.DataError, match="no labels"):
        train_tiny.balanced_subset(None, 2)


# ---- feature nets: stand-ins, then the real Inception network ------------------------------------

class FakeInception(nn.Module):
    """The StyleGAN2-ADA Inception's call convention; refuses non-uint8 input; 2048 features."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 2048, 1, bias=False)

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        if img.dtype != torch.uint8:
            raise RuntimeError("expected uint8 images")
        return self.proj(img.float()).mean(dim=[2, 3])


class FakeGeneric(nn.Module):
    """A generic feature net: refuses non-float input; features (min, max, mean, channels)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            raise RuntimeError("expected float32 images")
        f = x.reshape(x.shape[0], -1)
        return torch.stack([f.amin(1), f.amax(1), f.mean(1), torch.full([x.shape[0]], float(x.shape[1]))], 1)


def _script(module, path):
    torch.jit.script(module).save(str(path))
    return str(path)


def _sha(path):
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def test_inception_download_checksums_and_call(tmp_path):
    src = _script(FakeInception(), tmp_path / "src.pt")
    url = "file://" + src
    with pytest.raises(ValueError, match="checksum"):  # a wrong pinned checksum: nothing left behind
        train_tiny.load_feature_net("inception", str(tmp_path / "bad"), sha256="0" * 64, url=url)
    assert not (tmp_path / "bad").exists()
    net = train_tiny.load_feature_net("inception", str(tmp_path / "ok"), url=url)
    assert net.kind == "inception" and (tmp_path / "ok" / "inception-2015-12-05.pt.sha256").read_text() == _sha(src)
    imgs = _images(5)
    want = torch.jit.load(src)(imgs, return_features=True)
    torch.testing.assert_close(net(imgs), want)
    torch.testing.assert_close(net(imgs.float()), want)  # floats in [0, 255] become the same uint8 pixels
    assert net(imgs[:, :1]).shape == (5, 2048)           # grayscale is expanded to 3 channels
    torch.testing.assert_close(net(imgs, batch_size=2), want, rtol=1e-5, atol=1e-4)
    with open(tmp_path / "ok" / "inception-2015-12-05.pt", "ab") as f:  # tampered after the first download
        f.write(b"x")
    with pytest.raises(ValueError, match="sha256"):
        train_tiny.load_feature_net("inception", str(tmp_path / "ok"), url=url)


def test_generic_net_reference_stats_cache_and_fd(tmp_path, monkeypatch):
    net = train_tiny.load_feature_net(_script(FakeGeneric(), tmp_path / "fdnet.pt"))
    assert net.kind == "generic"
    imgs, other = _images(40, seed=1), _images(40, seed=2)
    x = imgs.double().reshape(40, -1)
    feats = torch.stack([x.amin(1), x.amax(1), x.mean(1), torch.full((40,), 3.0, dtype=torch.float64)], 1)
    cache = tmp_path / "ref.pt"
    mu, sigma = train_tiny.reference_stats(net, imgs, str(cache))
    torch.testing.assert_close(mu, feats.mean(0), rtol=1e-5, atol=0)  # features in float32, statistics in float64
    torch.testing.assert_close(sigma, torch.cov(feats.T), rtol=1e-5, atol=1e-5)
    calls = []
    real = train_tiny.FeatureNet.__call__
    monkeypatch.setattr(train_tiny.FeatureNet, "__call__", lambda *a, **k: calls.append(1) or real(*a, **k))
    mu2, sigma2 = train_tiny.reference_stats(net, imgs, str(cache))  # cached: no features computed
    assert calls == [] and torch.equal(mu, mu2) and torch.equal(sigma, sigma2)
    train_tiny.reference_stats(net, other, str(cache))               # other data: another key
    assert calls == [1]
    ref = (mu, sigma, speed.sqrt_psd(sigma))
    assert abs(train_tiny.fd_of_samples(net, imgs, ref)) < 1e-6 * float(sigma.trace())
    assert train_tiny.fd_of_samples(net, other, ref) == pytest.approx(speed.frechet_distance(other_feats(other), ref))
    with pytest.raises(ValueError, match="feature net"):
        train_tiny.load_feature_net(str(tmp_path / "missing.pt"))


def other_feats(imgs):
    x = imgs.float().reshape(len(imgs), -1)
    return torch.stack([x.amin(1), x.amax(1), x.mean(1), torch.full((len(imgs),), 3.0)], 1)


@needs_inception
def test_real_inception_on_two_images():
    """The real FID network through load_feature_net (channels-last on the CPU) against a direct call."""
    net = train_tiny.load_feature_net(SHARED_INCEPTION)
    imgs = _images(2, res=32, seed=3)
    feats = net(imgs)
    want = torch.jit.load(SHARED_INCEPTION).eval()(imgs, return_features=True)
    assert net.kind == "inception" and feats.shape == (2, 2048) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all() and (feats >= 0).all()  # pool3 features follow a ReLU
    torch.testing.assert_close(feats, want, rtol=0.02, atol=0.02)  # the net runs in fp16 either way


# ---- one run: seeds, resume, Ctrl-C --------------------------------------------------------------

def test_same_seed_gives_bit_identical_weights(tmp_path, data):
    for name in ("a", "b"):
        assert train_tiny.main(_argv(data, tmp_path / name, "--steps", "3", "--seed", "3")) == 0
    assert _same(_weights(tmp_path / "a"), _weights(tmp_path / "b"))


def test_strategies_of_one_seed_start_from_identical_weights(tmp_path, data, monkeypatch):
    starts, real = {}, speed.train

    def spy(model, images, schedule, strategy, **k):
        starts[strategy.config["name"], k["seed"]] = {n: v.clone() for n, v in model.state_dict().items()}
        return real(model, images, schedule, strategy, **k)

    monkeypatch.setattr(speed, "train", spy)
    for strategy, seed in [("speed", "3"), ("uniform", "3"), ("p2", "4")]:
        torch.rand(7)  # other code drawing from the global RNG in between must not matter
        assert train_tiny.main(_argv(data, tmp_path / strategy, "--steps", "1", "--seed", seed,
                                     "--strategy", strategy)) == 0
    assert _same(starts["speed", 3], starts["uniform", 3])
    assert not _same(starts["uniform", 3], starts["p2", 4])


def test_resume_of_another_experiment_is_refused(tmp_path, data, capsys):
    out = tmp_path / "run"
    assert train_tiny.main(_argv(data, out, "--steps", "2")) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["finished"] and m["steps"] == 2 and m["data"]["images"] == 16 and m["strategy_config"]["k"] == 5
    capsys.readouterr()
    for extra, field in [(["--strategy", "speed:k=2"], "strategy"), (["--lr", "0.01"], "lr"),
                         (["--limit", "8"], "data"), (["--model", "tiny"], "model")]:
        assert train_tiny.main(_argv(data, out, "--steps", "4", "--resume", *extra)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("train_tiny: --resume: ") and "another experiment" in err[0]
        assert field in err[0]
    assert train_tiny.main(_argv(data, out, "--steps", "4", "--resume")) == 0  # the same experiment continues
    assert json.loads((out / "metrics.json").read_text())["steps"] == 4


def test_ctrl_c_checkpoints_and_resume_matches_an_uninterrupted_run(tmp_path, data):
    argv = lambda out, *x: [sys.executable, TRAIN_TINY, *_argv(data, out, "--steps", "150", "--evals", "30", *x)]  # noqa
    whole = subprocess.Popen(argv(tmp_path / "whole"), env=ENV, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    cut = subprocess.Popen(argv(tmp_path / "cut"), env=ENV, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    partial = tmp_path / "cut" / "metrics.partial.json"
    deadline = time.time() + 60
    while not partial.exists() and cut.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    cut.send_signal(signal.SIGINT)  # after the first evaluation (step 5)
    err = cut.communicate(timeout=60)[1].strip().splitlines()
    step = json.loads(partial.read_text())["steps"]
    assert cut.returncode == 130 and err[-1] == f"interrupted at step {step}; continue with --resume"
    assert 5 <= step < 150 and torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=True)["step"] == step
    resumed = subprocess.run(argv(tmp_path / "cut", "--resume"), env=ENV, cwd=tmp_path, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert whole.wait(timeout=120) == 0
    assert _same(_weights(tmp_path / "cut"), _weights(tmp_path / "whole"))
    m = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert m["finished"] and m["steps"] == 150 and not (tmp_path / "cut" / "metrics.partial.json").exists()


# ---- the command line ----------------------------------------------------------------------------

BAD = [(["--strategy", "speed:k=0"], "--strategy speed:k=0: k "), (["--strategy", "speed:lam=2"], "lam"),
       (["--strategy", "nonsense"], "--strategy nonsense: "), (["--strategy", "speed:foo=1"], "valid"),
       (["--strategy", "speed:k"], "key=value"), (["--fid-model", "/etc/passwd"], "--fid-model /etc/passwd: "),
       (["--fid-model", "missing.pt"], "no such file"), (["--device", "cuda:99"], "--device cuda:99: "),
       (["--steps", "0"], "--steps"), (["--batch-size", "-1"], "--batch-size"), (["--lr", "0"], "--lr"),
       (["--ema-decay", "1"], "--ema-decay"), (["--dropout", "1"], "--dropout"),
       (["--eval-samplers", "ddpm250,ddim0"], "--eval-samplers"),
       (["--data", "nowhere.zip"], "--data nowhere.zip"), (["--resume"], "--resume: no checkpoint"),
       (["--preset", "big"], "--preset"), (["--bogus"], "unrecognized"),
       (["--seed", str(2 ** 64)], "--seed"), (["--eval-samples", "1"], "--eval-samples"),  # FD needs 2 samples
       (["--final-samples", "1"], "--final-samples")]


@pytest.mark.parametrize("bad, says", BAD, ids=[" ".join(b) for b, _ in BAD])
def test_bad_option_is_one_line_exit_2_and_creates_nothing(tmp_path, monkeypatch, capsys, bad, says):
    monkeypatch.chdir(tmp_path)
    assert train_tiny.main(["--quiet", *bad]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train_tiny: ") and says in err[0], err
    assert os.listdir(tmp_path) == []


def test_out_and_cache_over_a_file_and_a_checkpoint_that_is_no_file_are_option_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "f").write_text("")
    (tmp_path / "run" / "ckpt.pt").mkdir(parents=True)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "ckpt.pt").write_text("not a checkpoint")
    (tmp_path / "done").mkdir()
    torch.save({"step": 4}, tmp_path / "done" / "ckpt.pt")
    for bad, says in [(["--out", "f"], "--out f: "), (["--out", "f/sub"], "--out f/sub: "),
                      (["--cache", "f/c"], "--cache f/c: "), (["--out", "run", "--resume"], "--resume: "),
                      (["--out", "junk", "--resume"], "--resume: "),
                      (["--out", "done", "--resume", "--steps", "2"], "--steps 2: ")]:  # it would stop at 4, "done"
        assert train_tiny.main(["--quiet", *bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"train_tiny: {says}"), err
    assert sorted(os.listdir(tmp_path)) == ["done", "f", "junk", "run"] and os.listdir(tmp_path / "run") == ["ckpt.pt"]


def test_options_that_do_not_fit_the_data_name_the_option(tmp_path, data, capsys):
    # checked by speed.train once the data is known (16 images here): the message names the command-line option
    assert train_tiny.main(_argv(data, tmp_path / "run", "--batch-size", "32")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train_tiny: --batch-size must be") and "got 32" in err[0], err


def test_bad_options_as_subprocesses(tmp_path):
    cases = [["--strategy", "speed:k=0"], ["--fid-model", "/etc/passwd"], ["--device", "cuda:99"]]
    procs = [subprocess.Popen([sys.executable, TRAIN_TINY, *c], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for c in cases]
    for c, p in zip(cases, procs):
        out, err = p.communicate(timeout=60)
        assert p.returncode == 2 and out == "" and err.count("\n") == 1 and err.startswith(f"train_tiny: {c[0]} ")
    assert os.listdir(tmp_path) == []


def test_h100_preset_is_the_quick_search_winner_as_measured(tmp_path):
    import quick_search  # the default quick check must be exactly the configuration whose FID and wall were timed
    (tmp_path / "d.zip").touch()
    args = argparse.Namespace(work=str(tmp_path), data=str(tmp_path / "d.zip"), fid_model="none")
    _, _, _, argv, _ = quick_search.job("small_b256_lr1e3", 0, args)
    measured, default = (vars(train_tiny.parse_args(a)) for a in (argv, argv[:argv.index("--evals")]))
    assert measured == default and (default["model"], default["steps"], default["dropout"]) == ("small", 7500, 0)
    assert (default["batch_size"], default["lr"], default["cooldown"]) == (256, 1e-3, 1500)
    assert default["eval_samplers"] == "ddpm250"
    old = vars(train_tiny.parse_args(quick_search.job("preset_18k_3evals", 0, args)[3]))
    assert old["steps"] == 18000 and (old["evals"], old["final_samples"]) == (3, 10000)


def test_quick_search_result_reads_the_fid_and_names_the_host(tmp_path):
    import quick_search  # walls depend on the host's CPU (it compiles): every result says which one it ran on
    m = dict(evals={"ddpm250": [[7500, 16.4]]}, final=None, metric="FID", steps=7500, device="NVIDIA H100",
             history=[dict(img_per_s=10500.0)], seconds=dict(setup=20.0))
    (tmp_path / "metrics.json").write_text(json.dumps(m))
    r = quick_search.result("small_b256_cool", str(tmp_path), 350.0)
    assert (r["fid10k"], r["sampler"], r["wall_s"], r["img_per_s"]) == (16.4, "ddpm250", 350.0, 10500.0)
    assert r["options"] == quick_search.CANDIDATES["small_b256_cool"]
    assert sys.platform != "linux" or r["host"].endswith(f" × {os.cpu_count()}")
    (tmp_path / "metrics.json").write_text(json.dumps({**m, "final": {"ddpm250": 15.9}}))  # a final FID-10k wins
    assert quick_search.result("h100_preset", str(tmp_path), 350.0)["fid10k"] == 15.9
    probe = {**m, "evals": {"ddpm250": [[9000, 16.0]], "ddpm100": [[9000, 16.9]], "ddpm50": [[9000, 19.5]]}}
    (tmp_path / "metrics.json").write_text(json.dumps(probe))  # the sampler probe: every sampler's FID, the first's
    r = quick_search.result("probe_samplers", str(tmp_path), 450.0)
    assert (r["fid10k"], r["sampler"]) == (16.0, "ddpm250")
    assert r["fids"] == {"ddpm250": 16.0, "ddpm100": 16.9, "ddpm50": 19.5}


def test_quick_search_summary_counts_a_rerun_elsewhere_as_a_run_of_its_candidate():
    import quick_search  # a seed rerun on another lease is keyed name_sSEED@lease: its own entry, the same candidate
    r = lambda fid, wall: dict(fid10k=fid, wall_s=wall)  # noqa: E731
    rows = quick_search.summary({"a_b_s0": r(17.0, 350), "a_b_s1": r(18.0, 340), "a_b_s0@lease6": r(16.0, 415),
                                 "c_s0": r(16.5, 300)})
    assert list(rows) == ["c", "a_b"]  # best mean FID first
    assert rows["a_b"] == (3, pytest.approx(17.0), pytest.approx(1.0), 415)
    assert rows["c"] == (1, 16.5, 0.0, 300)


def _assert_same_run(now, ran, where):
    """Parsed options `now` train what a committed run's recorded config `ran` trained (runs from before --dropout
    recorded None: the size's dropout)."""
    for k in ("strategy", "model", "steps", "batch_size", "lr", "warmup", "ema_decay", "evals", "eval_samples",
              "final_samples", "eval_samplers", "schedule", "precision", "compile"):
        assert now[k] == ran[k], (where, k)
    assert now["cooldown"] == ran.get("cooldown", 0), (where, "cooldown")  # runs from before it: none
    rate = lambda d: speed.UNET_SIZES[ran["model"]]["dropout"] if d is None else d  # noqa: E731
    assert rate(now["dropout"]) == rate(ran.get("dropout")), (where, "dropout")


def test_quick_search_candidates_still_mean_what_was_measured(tmp_path):
    import quick_search  # a candidate's options sit on top of the preset: a new preset must not change a measured run
    args = argparse.Namespace(work=str(tmp_path), data=str(tmp_path / "d.zip"), fid_model="none")
    (tmp_path / "d.zip").touch()
    runs = sorted(glob.glob(os.path.join(os.path.dirname(TRAIN_TINY), "bench", "results", "quick_search", "*_s*",
                                         "metrics.json")))
    assert len(runs) >= 8
    for path in runs:
        name = os.path.basename(os.path.dirname(path)).rsplit("_s", 1)[0]
        ran, now = json.load(open(path))["config"], vars(train_tiny.parse_args(quick_search.job(name, 0, args)[3]))
        _assert_same_run(now, ran, name)
    for name in quick_search.CANDIDATES:  # the ones not run yet parse too: a typo would waste a device call
        train_tiny.parse_args(quick_search.job(name, 0, args)[3])


def _run_options(command, tmp_path):
    """train_tiny's parsed options (h100 preset: the default on a GPU) of the part after ' -- ' of a compare.py
    command, with its data and feature net replaced by stand-ins."""
    options = command.replace("\\\n", " ").split(" -- ", 1)[1].split()
    options[options.index("--data") + 1] = str(tmp_path / "d.zip")
    (tmp_path / "d.zip").touch()
    return vars(train_tiny.parse_args(["--preset", "h100", *options, "--fid-model", "none"]))


def _protocol_options(tmp_path):  # what run_protocol.sh passes to every run
    text = open(os.path.join(os.path.dirname(TRAIN_TINY), "bench", "run_protocol.sh")).read()
    return _run_options(" -- " + text.split("--resume -- ", 1)[1].split("$EXTRA", 1)[0], tmp_path)


def test_protocol_script_still_means_what_its_committed_runs_ran(tmp_path):
    # run_protocol.sh passes options on top of the h100 preset: a preset change must not change the protocol
    now = _protocol_options(tmp_path)
    runs = glob.glob(os.path.join(os.path.dirname(TRAIN_TINY), "bench", "results", "protocol", "*", "*_s*",
                                  "metrics.json"))
    assert len(runs) >= 20
    for path in runs:
        ran = json.load(open(path))["config"]
        assert ran["preset"] == "h100"
        _assert_same_run({**now, "strategy": ran["strategy"]}, ran, path)  # compare.py sets each run's strategy


def test_documented_comparison_commands_train_what_the_protocol_trained(tmp_path):
    # compare.py's docstring and the notebook show how to rerun the comparison: the same training as run_protocol.sh
    root, want = os.path.dirname(TRAIN_TINY), _protocol_options(tmp_path)
    doc = compare.__doc__.split("python bench/compare.py", 2)[1]
    cell = next("".join(c["source"]) for c in json.load(open(os.path.join(root, "tutorial.ipynb")))["cells"]
                if "bench/compare.py --strategies uniform,speed --seeds" in "".join(c["source"]))
    notebook = cell.split("python bench/compare.py", 1)[1].split("```", 1)[0]
    for where, command in (("compare.py", doc), ("tutorial.ipynb", notebook)):
        _assert_same_run(_run_options(command, tmp_path), want, where)


def test_losses_are_logged_every_1000_steps_even_with_one_evaluation(tmp_path, data, monkeypatch):
    seen = []  # the h100 preset evaluates once, at the end: the progress bar still shows the loss as it trains

    def fake_train(*a, **k):
        seen.append(k)
        raise KeyboardInterrupt
    monkeypatch.setattr(speed, "train", fake_train)
    assert train_tiny.main(_argv(data, tmp_path / "run", "--steps", "3000", "--evals", "1")) == 130
    assert (seen[0]["log_every"], seen[0]["callback_every"]) == (1000, 3000)


def test_out_of_gpu_memory_is_one_line_naming_the_batch_size(tmp_path, data, monkeypatch, capsys):
    def fake_train(*a, **k):  # what a GPU too small for the h100 preset's batch raises at the first step
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(speed, "train", fake_train)
    assert train_tiny.main(_argv(data, tmp_path / "run", "--steps", "2", "--batch-size", "4")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("train_tiny: out of memory on cpu (micro UNet, --batch-size 4)")


def test_cpu_default_says_what_runs_and_where_outputs_are(tmp_path, data, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert train_tiny.main(["--data", data["zip"], "--cache", data["cache"], "--quiet", "--batch-size", "2",
                            "--steps", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("train_tiny: preset cpu: a smoke run") and "noise" in lines[0]
    assert lines[-1] == f"train_tiny: outputs in {os.path.join('runs', 'speed')} (metrics.json, samples.png, ckpt.pt)"


def test_dropout_option_sets_every_dropout_of_the_unet(tmp_path, data, monkeypatch):
    seen, real = [], speed.train
    monkeypatch.setattr(speed, "train", lambda model, *a, **k: seen.append(model) or real(model, *a, **k))
    for p in ("0.3", None):
        assert train_tiny.main(_argv(data, tmp_path / str(p), "--steps", "1", "--model", "tiny",
                                     *(["--dropout", p] if p else []))) == 0
    rates = [{m.p for m in model.modules() if isinstance(m, nn.Dropout)} for model in seen]
    assert rates == [{0.3}, {speed.UNET_SIZES["tiny"]["dropout"]}]


def test_h100_preset_compiles_unless_no_compile(tmp_path, data, monkeypatch):
    parse = lambda *a: train_tiny.parse_args(["--fid-model", "none", "--out", str(tmp_path), *a])  # noqa: E731
    assert parse("--preset", "h100").compile and not parse("--preset", "h100", "--no-compile").compile
    assert not parse("--preset", "t4").compile and not parse("--preset", "cpu").compile
    seen, real = [], speed.train
    monkeypatch.setattr(speed, "train", lambda *a, **k: seen.append(k["compile"]) or real(*a, **k))
    assert train_tiny.main(_argv(data, tmp_path / "run", "--steps", "1")) == 0
    assert seen == [False]  # only on a GPU


CHILD_ARCH, CHILD_N = dict(ch=8, ch_mult=(1,), num_blocks=1, attn_res=(), dropout=0.1, img_res=8), 6  # dropout: eval()


@pytest.fixture(scope="module", autouse=True)
def child_compile(request, tmp_path_factory, data):
    """train_tiny.precompile's child, started with this file's first test: it computes the reference statistics of
    the data and compiles (~30 s here) while they run; the last test checks its caches. Started from another
    folder: the child finds train_tiny wherever it is run."""
    test = "test_the_childs_reference_and_compile_are_cache_hits_for_the_evaluation"
    if not any(t.name == test for t in request.session.items):
        yield None  # that test is not selected: no child
        return
    cache = tmp_path_factory.mktemp("inductor")
    opts = dict(data=data["zip"], cache=str(cache / "cache"), limit=None, subset=6,
                fid_model=_script(FakeGeneric(), cache / "fdnet.pt"), device="cpu")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
        mp.setenv("OMP_NUM_THREADS", "1")  # as one_thread() sets this process: C++ kernels specialise on it
        mp.chdir(cache)
        child = train_tiny.precompile(CHILD_ARCH, (3, 8, 8), min(train_tiny.SAMPLE_BATCH, CHILD_N), "cpu",
                                      str(cache / "compile.log"), opts)
    yield child, cache, opts
    child.kill()


def test_sampler_net_compiles_static_shapes(monkeypatch):
    seen = []  # the step compiled UNet.forward at the training batch first: the sampler's batch must not go dynamic
    monkeypatch.setattr(torch, "compile", lambda m, **k: seen.append(k) or m)
    net = nn.Linear(1, 1)
    assert train_tiny.sampler_net(net) is net and seen == [dict(dynamic=False)]


def test_evaluations_per_sampler_with_a_feature_net(tmp_path, data):
    fdnet = _script(FakeGeneric(), tmp_path / "fdnet.pt")
    out = tmp_path / "run"
    assert train_tiny.main(_argv(data, out, "--steps", "4", "--evals", "2", "--fid-model", fdnet,
                                 "--eval-samplers", "ddpm3,ddim2", "--eval-samples", "8", "--final-samples", "12")) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["metric"] == "FD-fdnet" and list(m["evals"]) == ["ddpm3", "ddim2"]
    assert all([s for s, _ in c] == [2, 4] and all(math.isfinite(f) for _, f in c) for c in m["evals"].values())
    assert set(m["final"]) == {"ddpm3", "ddim2"} and m["final_samples"] == 12
    assert torch.load(out / "ckpt.pt", weights_only=True)["extra"]["evals"] == m["evals"]
    sub = tmp_path / "sub"  # --subset: a fixed class-balanced subset, the reference statistics of it
    assert train_tiny.main(_argv(data, sub, "--steps", "2", "--evals", "1", "--subset", "6", "--fid-model", fdnet,
                                 "--eval-samples", "4")) == 0
    assert json.loads((sub / "metrics.json").read_text())["data"]["images"] == 6


def test_metrics_say_where_the_time_went(tmp_path, data, monkeypatch):
    real = train_tiny.fd_of_samples  # each FD takes 0.1 s longer: 2 evaluations x 2 samplers, then a final of 2

    def slow(*a):
        time.sleep(0.1)
        return real(*a)
    monkeypatch.setattr(train_tiny, "fd_of_samples", slow)
    load = train_tiny.load_data  # and the data 0.3 s: a part of the setup
    monkeypatch.setattr(train_tiny, "load_data", lambda *a: time.sleep(0.3) or load(*a))
    out = tmp_path / "run"  # and what torch.compile's cache did (in this process: nothing; a GPU run fills it)
    monkeypatch.setitem(torch._dynamo.utils.counters, "inductor", collections.Counter(
        fxgraph_cache_hit=1, fxgraph_cache_miss=2, pattern_matcher_count=7))
    assert train_tiny.main(_argv(data, out, "--steps", "2", "--evals", "2", "--fid-model", _script(
        FakeGeneric(), tmp_path / "fdnet.pt"), "--eval-samplers", "ddpm3,ddim2", "--eval-samples", "4",
        "--final-samples", "4")) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["compile_cache"] == dict(fxgraph_cache_hit=1, fxgraph_cache_miss=2)
    secs = m["seconds"]
    assert secs["evals"] >= 0.4 and 0.2 <= secs["final"] < secs["evals"] and 0.3 <= secs["data"] <= secs["setup"]
    per = {k: v for k, v in secs.items() if k.startswith("eval_")}  # each sampler's share of evals and final
    assert sorted(per) == ["eval_ddim2", "eval_ddpm3"] and min(per.values()) >= 0.3
    assert sum(per.values()) <= secs["evals"] + secs["final"]
    for s in ("ddim2", "ddpm3"):  # the sampling alone: without the 3 x 0.1 s of the FDs
        assert 0 < secs["sample_" + s] <= secs["eval_" + s] - 0.3
    assert sum(v for k, v in secs.items() if k != "data" and not k.startswith(("eval_", "sample_"))) <= m["wall_s"]


# ---- bench/compare.py: speed-ups, summary, launching ---------------------------------------------

def test_steps_to_reach_interpolates_the_first_crossing():
    steps = [100, 200, 300]
    assert compare.steps_to_reach(steps, [10.0, 8.0, 4.0], 6.0) == 250.0
    assert compare.steps_to_reach(steps, [10.0, 8.0, 4.0], 8.0) == 200.0
    assert compare.steps_to_reach(steps, [5.0, 4.0, 3.0], 6.0) == 100.0
    assert compare.steps_to_reach(steps, [10.0, 8.0, 4.0], 3.0) is None
    assert compare.steps_to_reach([10, 20, 30, 40], [9.0, 5.0, 7.0, 3.0], 6.0) == 17.5  # first crossing
    base_steps, base = [10, 20, 30, 40], [9.0, 7.0, 6.0, 5.5]
    factor, need = compare.speedup(base_steps, base, [10, 20, 30, 40], [8.0, 4.0, 3.0, 2.0])
    assert need == pytest.approx(10 + 10 * 2.5 / 4) and factor == pytest.approx(40 / need)
    assert compare.speedup(base_steps, base, base_steps, base) == (1.0, 40.0)
    assert compare.speedup(base_steps, base, base_steps, [9.0, 8.0, 7.0, 6.0]) == (None, None)


def _fake_run(out, spec, seed, evals, final=None, finished=True):
    d = compare.run_dir(str(out), spec, seed)
    os.makedirs(d, exist_ok=True)
    m = dict(strategy=spec, seed=seed, metric="FID", evals=evals, final=final, final_samples=100, finished=finished,
             steps=max(s for c in evals.values() for s, _ in c), wall_s=1.0, data={}, device="cpu",
             config=dict(eval_samples=50))
    with open(os.path.join(d, "metrics.json" if finished else "metrics.partial.json"), "w") as f:
        json.dump(m, f)


def _curve(*fds):  # an evaluation curve [[step, quality], ...] at steps 10, 20, ...
    return [[10 * (i + 1), f] for i, f in enumerate(fds)]


def test_summary_per_sampler_per_seed_and_mean_curve(tmp_path):
    _fake_run(tmp_path, "uniform", 0, dict(ddpm=_curve(10, 8, 6, 4), ddim=_curve(12, 10, 9, 8)),
              final=dict(ddpm=3.5, ddim=7.5))
    _fake_run(tmp_path, "uniform", 1, dict(ddpm=_curve(10, 8, 6, 6), ddim=_curve(12, 10, 9, 8)),
              final=dict(ddpm=3.9, ddim=7.9))
    _fake_run(tmp_path, "speed", 0, dict(ddpm=_curve(8, 4, 3, 2), ddim=_curve(12, 11, 10, 9)),
              final=dict(ddpm=1.5, ddim=8.5))
    _fake_run(tmp_path, "speed", 1, dict(ddpm=_curve(9, 5, 4), ddim=_curve(12, 11, 10)), finished=False)  # at step 30
    s = compare.summarize(str(tmp_path), ["uniform", "speed"], [0, 1], quiet=True)
    assert s["samplers"] == ["ddpm", "ddim"] and s["curves"]["ddpm"]["uniform"]["steps"] == [10, 20, 30]
    uni, sp = s["rows"]
    assert uni["ddpm"]["speedup_mean_curve"] == 1.0 and uni["ddpm"]["final_mean"] == pytest.approx(3.7)
    assert sp["ddpm"]["final_mean"] == pytest.approx((1.5 + 4) / 2)  # an unfinished run: its last evaluation
    assert sp["ddpm"]["final_samples"] == [50, 100]
    # uniform's mean curve 10, 8, 6 ends at 6; speed's mean 8.5, 4.5, 3.5 reaches 6 at 10 + 10 * 2.5 / 4
    assert sp["ddpm"]["steps_to_base_final"] == pytest.approx(16.25)
    assert sp["ddpm"]["speedup_mean_curve"] == pytest.approx(30 / 16.25)
    # per seed, against the same seed's baseline: seed 0 reaches 6 at 10 + 10 * 2 / 4 = 15, seed 1 at 17.5
    assert sp["ddpm"]["speedup_per_seed"] == {"0": pytest.approx(2.0), "1": pytest.approx(30 / 17.5)}
    assert sp["ddim"]["speedup_mean_curve"] is None and sp["ddim"]["not_reached_seeds"] == 2
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert set(saved["runs"]) == {"uniform_s0", "uniform_s1", "speed_s0", "speed_s1"}
    assert saved["runs"]["speed_s1"]["finished"] is False and saved["runs"]["speed_s1"]["evals"]["ddpm"][-1] == [30, 4]
    table = (tmp_path / "compare.md").read_text()
    assert "ddpm" in table and "ddim" in table and "1.85×" in table and (tmp_path / "compare.png").exists()


def test_summary_reads_missing_runs_from_another_arm(tmp_path, capsys):
    full, attrib = tmp_path / "full", tmp_path / "attrib"
    _fake_run(full, "uniform", 0, dict(ddpm=_curve(10, 8, 6, 4)))
    _fake_run(attrib, "uniform", 0, dict(ddpm=_curve(10, 8, 6, 2)))     # another arm's own uniform run wins
    _fake_run(full, "uniform", 1, dict(ddpm=_curve(10, 8, 6, 4)))
    _fake_run(attrib, "speed:k=1", 0, dict(ddpm=_curve(8, 4, 3, 2)))
    argv = ["--strategies", "uniform,speed:k=1", "--seeds", "0,1", "--out", str(attrib)]
    assert compare.main(argv + ["--summarize", "--runs-from", str(full)]) == 0
    s = json.loads((attrib / "compare.json").read_text())
    assert s["runs"]["uniform_s0"]["folder"] == "uniform_s0" and s["runs"]["uniform_s1"]["folder"] == "../full/uniform_s1"
    assert s["curves"]["ddpm"]["uniform"]["per_seed"] == {"0": [10, 8, 6, 2], "1": [10, 8, 6, 4]}
    assert s["rows"][1]["ddpm"]["speedup_per_seed"]["0"] == pytest.approx(1.0)  # reaches uniform's 2 at step 40
    assert compare.main(argv + ["--runs-from", str(full)]) == 2 and "--runs-from" in capsys.readouterr().err


def test_no_speedup_from_fewer_than_three_evaluations(tmp_path):
    _fake_run(tmp_path, "uniform", 0, dict(ddim=[[10, 9.0], [20, 4.0]]))
    _fake_run(tmp_path, "speed", 0, dict(ddim=[[10, 5.0], [20, 2.0]]))
    s = compare.summarize(str(tmp_path), ["uniform", "speed"], [0], quiet=True)
    for row in s["rows"]:
        assert row["ddim"]["speedup_mean_curve"] is None and "at least 3" in row["ddim"]["note"]
    assert "×" not in (tmp_path / "compare.md").read_text()


def test_protocol_report_tables_each_arm_with_per_seed_speedups_and_best_points(tmp_path, monkeypatch):
    import protocol_report
    full, small = tmp_path / "full", tmp_path / "small"
    _fake_run(full, "uniform", 0, dict(ddpm=_curve(10, 8, 6)), final=dict(ddpm=5.5))
    _fake_run(full, "uniform", 1, dict(ddpm=_curve(10, 8, 4)), final=dict(ddpm=4.5))
    _fake_run(full, "speed", 0, dict(ddpm=_curve(8, 4, 5)), final=dict(ddpm=4.0))  # best point 4 at 20, not the last
    _fake_run(full, "speed", 1, dict(ddpm=_curve(9, 9, 9)), final=dict(ddpm=9.0))  # never reaches its baseline's 4
    _fake_run(small, "uniform", 0, dict(ddpm=_curve(20, 18, 16)), final=dict(ddpm=15.0))
    _fake_run(small, "speed", 0, dict(ddpm=_curve(20, 16, 15)), final=dict(ddpm=14.0))
    compare.summarize(str(full), ["uniform", "speed"], [0, 1], quiet=True)
    compare.summarize(str(small), ["uniform", "speed"], [0], quiet=True)
    monkeypatch.setattr(sys, "argv", ["protocol_report.py", "--folder", str(tmp_path)])
    protocol_report.main()
    report = (tmp_path / "report.md").read_text()
    full_part, small_part = report.split("## small")
    speed_full = next(line for line in full_part.splitlines() if line.startswith("| speed |"))
    cells = [x.strip() for x in speed_full.strip("|").split("|")]
    assert cells[:3] == ["speed", "2", f"6.50 ± {2.5 * 2 ** 0.5:.2f}"]  # FID-10k mean ± std over the two seeds
    assert cells[3] == "6.50 at 15"  # best of each seed's curve (4 at 20, 9 at 10), averaged: not the last points
    # uniform's mean curve 10, 8, 5 ends at 5; speed's mean 8.5, 6.5, 7 never reaches it; per seed: seed 0 reaches
    # uniform seed 0's 6 at 10 + 10 * 2 / 4 = 15 (30 / 15 = 2), seed 1 never reaches 4
    assert cells[4] == "not reached (2.00, not reached)"
    speed_small = next(line for line in small_part.splitlines() if line.startswith("| speed |"))
    assert "14.00 |" in speed_small and "±" not in speed_small.split("|")[3]  # one seed: no spread
    assert (tmp_path / "protocol.png").stat().st_size > 0


def test_profile_groups_kernels_by_kind():
    import bench_speed  # the ddpm profile's breakdown (issue 11): fused Triton kernels are not counted as convolutions
    kinds = {"void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>": "matmul/conv",
             "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc": "matmul/conv",
             "triton_tem_fused_mm_3": "matmul/conv",
             "triton_poi_fused_convolution_backward_native_group_norm_7": "fused by torch.compile",
             "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>": "attention",
             "void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel_group_norm": "normalization",
             "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>": "other"}
    assert {name: bench_speed.kernel_kind(name) for name in kinds} == kinds


def test_profile_table_counts_kernels_not_compiled_graph_ranges():
    import bench_speed  # op-by-op profiles also hold '## Call CompiledFxGraph' ranges spanning the graph's kernels
    from types import SimpleNamespace as NS
    cuda, cpu = bench_speed.torch.autograd.DeviceType.CUDA, bench_speed.torch.autograd.DeviceType.CPU

    def ev(name, us, device=cuda):
        return NS(name=name, device_type=device, time_range=NS(elapsed_us=lambda: us))
    events = [ev("## Call CompiledFxGraph fabc ##", 900.0), ev("sm90_xmma_fprop_implicit_gemm", 300.0),
              ev("triton_poi_fused_add_3", 200.0), ev("triton_poi_fused_add_3", 100.0), ev("aten::copy_", 50.0, cpu)]
    by_kind, by_name, per_step = bench_speed.kernel_table(NS(events=lambda: events), steps=2)
    assert by_kind == pytest.approx({"matmul/conv": 0.15, "fused by torch.compile": 0.15}) and per_step == 1.5
    assert by_name["triton_poi_fused_add_3"] == pytest.approx(0.15)


def test_launch_packs_runs_per_gpu_and_reports_failures(tmp_path, monkeypatch):
    fake = tmp_path / "fake.py"
    fake.write_text("import json, os, sys, time\nd = sys.argv[sys.argv.index('--out') + 1]\ntime.sleep(0.3)\n"
                    "json.dump(dict(gpu=os.environ.get('CUDA_VISIBLE_DEVICES'), omp=os.environ['OMP_NUM_THREADS'],\n"
                    "               extra=os.environ.get('EXTRA_VAR'), t=time.time()),\n"
                    "          open(os.path.join(d, 'env.json'), 'w'))\n"
                    "sys.exit(3 if 'fail' in d else 0)\n")
    monkeypatch.setattr(compare, "TRAIN_TINY", str(fake))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    jobs = [(f"s{i}", 0, str(tmp_path / ("fail" if i == 4 else f"r{i}")), ["--out", str(tmp_path / (
        "fail" if i == 4 else f"r{i}"))]) for i in range(5)]
    jobs[1] += ({"EXTRA_VAR": "x"},)  # a job's own environment on top
    walls = {}
    failed = compare.launch(jobs, gpus=[0, 1], per_gpu=2, prepare=False, walls=walls)
    assert failed == [("s4", 0, 3)]
    assert set(walls) == {(f"s{i}", 0) for i in range(4)} and all(0.3 <= w < 30 for w in walls.values())
    envs = [json.load(open(os.path.join(j[2], "env.json"))) for j in jobs]
    assert [e["extra"] for e in envs] == [None, "x", None, None, None]
    assert [e["gpu"] for e in envs[:4]] == ["0", "0", "1", "1"] and envs[4]["gpu"] in ("0", "1")
    assert {e["omp"] for e in envs} == {"2"}  # 8 cores over 4 slots
    assert os.path.exists(tmp_path / "fail" / "log.txt")


def test_compare_rejects_bad_options_before_any_run(tmp_path, monkeypatch, capsys, data):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(compare, "launch", lambda *a, **k: 1 / 0)
    for argv, says in [(["--strategies", "uniform,nonsense"], "--strategies: nonsense"),
                       (["--strategies", "uniform,speed,uniform"], "--strategies"),  # two runs, one folder
                       (["--strategies", "uniform", "--seeds", "0,1,0"], "--seeds"),
                       (["--strategies", "uniform", "--gpus", "99"], "--gpus 99: no such GPU"),
                       (["--strategies", "uniform", "--", "--steps", "0"], "--steps"),
                       (["--strategies", "uniform", "--", "--seed", "1"], "--seed: set per run"),
                       (["--strategies", "uniform", "--per-gpu", "0"], "--per-gpu")]:
        assert compare.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("compare: ") and says in err[0], err
    assert os.listdir(tmp_path) == []


def test_compare_end_to_end_then_resume_skips_finished_runs(tmp_path, data, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fdnet = _script(FakeGeneric(), tmp_path / "fdnet.pt")
    run_args = ["--preset", "cpu", "--data", data["zip"], "--cache", data["cache"], "--batch-size", "2", "--steps", "6",
                "--evals", "3", "--fid-model", fdnet, "--eval-samplers", "ddpm3,ddim2", "--eval-samples", "8"]
    argv = ["--strategies", "uniform,speed", "--seeds", "0", "--out", "cmp", "--per-gpu", "2", "--", *run_args]
    assert compare.main(argv) == 0
    s = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert set(s["runs"]) == {"uniform_s0", "speed_s0"} and s["samplers"] == ["ddpm3", "ddim2"]
    assert all([st for st, _ in r["evals"]["ddim2"]] == [2, 4, 6] for r in s["runs"].values())
    assert s["rows"][0]["ddpm3"]["speedup_mean_curve"] == 1.0
    launched = []
    monkeypatch.setattr(compare, "launch", lambda jobs, *a, **k: launched.extend(jobs) or [])
    assert compare.main(argv) == 2                     # finished runs there: --resume or another --out
    assert compare.main(["--resume", *argv]) == 0 and launched == []


def test_cache_keys_names_the_component_a_miss_differs_in(tmp_path, capsys):
    import cache_keys  # reads TORCH_TRACE logs (a header line, then the payload's lines after a tab)

    def log(name, *events, text="train_tiny.py"):  # events: (kind, key, {component: value}); text: an interned str
        lines = [f'V1208 05:45:10.0 7057 x.py:1] {{"str": ["{text}", 0]}}']
        for kind, key, comps in events:
            comps = [f"[{hashlib.md5(v.encode()).hexdigest()[:8]}] {c}: {v}" for c, v in comps.items()]
            lines += [f'V1208 05:45:11.1 7057 x.py:217] {{"artifact": {{"name": "{kind}", "encoding": "json"}}}}',
                      "\t" + json.dumps(dict(key=key, components=comps) if key else dict(cache_bypass_reason="pickle"))]
        lines += ['V1208 05:45:12.0 7057 x.py:2009] {"compilation_metrics": {"co_name": "forward", '
                  '"entire_frame_compile_time_s": 29.5}}', 'V1208 05:45:13.0 7057 x.py:3] {"artifact": {"name": "cut']
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    graph = dict(gm="def forward(x): " + "y = x; " * 100 + "return y", inductor_config="{'autotune_pointwise': False}")
    log("child.log", ("fx_graph_cache_miss", "kchild", {**graph, "example_inputs[0]": "stride=(64, 1, 64, 64)"}),
        text="train_tiny.prepare_evaluation")
    log("parent.log", ("fx_graph_cache_miss", "kstep", dict(gm="def backward(g)")), ("fx_graph_cache_bypass", None, {}),
        ("fx_graph_cache_miss", "kparent", {**graph, "gm": graph["gm"].replace("return y", "return -y"),
                                            "example_inputs[0]": "stride=(64, 1, 1, 1)"}))
    logs = cache_keys.explain(str(tmp_path), width=40)
    assert [k for k, _ in cache_keys.events(logs["parent.log (trainer)"])] == ["miss", "bypass", "miss"]
    out = capsys.readouterr().out
    assert "bypass - pickle" in out and "frame forward: 29.5 s compiling" in out  # a bypass has no key
    parent = out.split("parent.log (trainer) missed kparent")[1].split("missed")[0]  # closest: the child's entry
    assert "closest: child.log (child): 2 components differ, 1 of them inputs' metadata" in parent
    assert "(64, 1, 1, 1)" in parent and "(64, 1, 64, 64)" in parent and "inductor_config" not in parent
    assert "return -y" in parent and "return y" in parent  # where the graphs part, not their shared start


def test_every_mutant_of_bench_mutations_still_applies_to_speed_py():
    import mutations  # a mutant whose pattern speed.py lost would stop the script: catch it here, not on a rerun
    source = open(os.path.join(HERE, "speed.py")).read()
    for name, edits in mutations.MUTANTS:
        assert mutations.apply(source, edits, name) != source, name


def test_the_childs_reference_and_compile_are_cache_hits_for_the_evaluation(child_compile, monkeypatch):
    # the child compiled in a fresh process; the evaluation, after run()'s fast_math, must find its graph on disk
    child, cache, opts = child_compile
    assert child.wait(timeout=600) == 0, (cache / "compile.log").read_text()
    # its reference statistics (of the --subset) are in the file that run()'s setup names: read, not recomputed
    images, _, net, path = train_tiny.setup(argparse.Namespace(**opts))
    want = speed.feature_stats(net(images))
    monkeypatch.setattr(train_tiny.FeatureNet, "__call__", lambda *a, **k: pytest.fail("features recomputed"))
    got = train_tiny.reference_stats(net, images, path)
    assert len(images) == 6 and all(torch.equal(a, b) for a, b in zip(got, want))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    train_tiny.fast_math()  # as run() starts
    torch.manual_seed(1)  # other weights than the child's: the cache keys on the graph, not on the values
    ema = speed.UNet(**CHILD_ARCH).eval().requires_grad_(False)
    speed.ddpm_sample(train_tiny.sampler_net(ema), speed.make_schedule("cosine"), CHILD_N, shape=(3, 8, 8),
                      steps=2, device="cpu", batch_size=train_tiny.SAMPLE_BATCH)
    hits = torch._dynamo.utils.counters["inductor"]["fxgraph_cache_hit"]
    torch._dynamo.reset()
    assert hits == 1
