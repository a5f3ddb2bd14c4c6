"""The suite's background work: train_tiny's compile children start with the first test (see child_compiles)."""
import pytest

import train_tiny

CHILD_ARCH, CHILD_N = dict(ch=8, ch_mult=(1,), num_blocks=1, attn_res=(), dropout=0.1, img_res=8), 6  # dropout: eval()


@pytest.fixture(scope="session", autouse=True)
def child_compiles(request, tmp_path_factory):
    """train_tiny.precompile's two children (the step's, the sampler network's), started with the suite's first test:
    they compile (~45 and ~30 s of CPU) while the tests run; the last two tests of test_train_tiny.py check their
    cache. Started from another folder: a child finds train_tiny wherever it is run."""
    if not {"test_the_childs_compile_is_a_cache_hit_for_the_evaluation",
            "test_the_step_childs_compile_is_a_cache_hit_for_training"} & {t.name for t in request.session.items}:
        yield None  # neither test is selected: no child
        return
    cache = tmp_path_factory.mktemp("inductor")
    log = str(cache / "compile.log")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
        mp.setenv("OMP_NUM_THREADS", "1")  # as one_thread() (test_train_tiny) sets the tests: C++ kernels specialise on it
        mp.chdir(cache)
        children = [train_tiny.precompile(train_tiny.compile_step, log, CHILD_ARCH, (3, 8, 8), CHILD_N, "auto", "cpu"),
                    train_tiny.precompile(train_tiny.compile_sampler_net, log, CHILD_ARCH, (3, 8, 8),
                                          min(train_tiny.SAMPLE_BATCH, CHILD_N), "cpu")]
    yield *children, cache
    [child.kill() for child in children]
