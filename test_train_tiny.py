"""Tests of train_tiny.py (data, feature nets, one run, the command line) and the bench/ scripts.

Runs use a small generated dataset (8x8 images) and the micro UNet, so each takes seconds on a CPU; the
tests of the real Inception network and the shared data skip where ../shared is absent. No test
touches the network: downloads go to file:// URLs or are blocked.
"""
import argparse
import glob
import hashlib
import io
import json
import math
import os
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
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


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
       (["--preset", "big"], "--preset"), (["--bogus"], "unrecognized")]


@pytest.mark.parametrize("bad, says", BAD, ids=[" ".join(b) for b, _ in BAD])
def test_bad_option_is_one_line_exit_2_and_creates_nothing(tmp_path, monkeypatch, capsys, bad, says):
    monkeypatch.chdir(tmp_path)
    assert train_tiny.main(["--quiet", *bad]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train_tiny: ") and says in err[0], err
    assert os.listdir(tmp_path) == []


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


from conftest import CHILD_ARCH, CHILD_N  # noqa: E402 - the children compile these from the suite's start


def test_every_mutant_of_bench_mutations_still_applies_to_speed_py():
    import mutations  # a mutant whose pattern speed.py lost would stop the script: catch it here, not on a rerun
    source = open(os.path.join(HERE, "speed.py")).read()
    for name, edits in mutations.MUTANTS:
        assert mutations.apply(source, edits, name) != source, name


def test_the_step_childs_compile_is_a_cache_hit_for_training(child_compiles, monkeypatch):
    # the child compiled one step of a fresh UNet in a fresh process; training another, as run() trains it, must find
    # both of its graphs (forward, backward) and the autograd graph around them on disk
    child, _, cache = child_compiles
    assert child.wait(timeout=600) == 0, (cache / "compile.log").read_text()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    train_tiny.fast_math()  # as run() starts
    torch.manual_seed(1)  # other weights, data, strategy and schedule than the child's: none enter the graphs
    images, schedule = torch.randint(0, 256, (2 * CHILD_N, 3, 8, 8), dtype=torch.uint8), speed.make_schedule("cosine")
    speed.train(speed.UNet(**CHILD_ARCH), images, schedule, speed.make_strategy("speed", schedule), steps=1,
                batch_size=CHILD_N, compile=True, device="cpu", progress=False, seed=3)
    counters = torch._dynamo.utils.counters
    hits = counters["inductor"]["fxgraph_cache_hit"], counters["aot_autograd"]["autograd_cache_hit"]
    torch._dynamo.reset()
    assert hits == (2, 1)


def test_the_childs_compile_is_a_cache_hit_for_the_evaluation(child_compiles, monkeypatch):
    # the child compiled in a fresh process; the evaluation, after run()'s fast_math, must find its graph on disk
    _, child, cache = child_compiles
    assert child.wait(timeout=600) == 0, (cache / "compile.log").read_text()
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
