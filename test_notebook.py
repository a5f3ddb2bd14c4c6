"""tutorial.ipynb runs: top to bottom in its small CPU mode, and its setup on a fresh machine (Colab)
where speed.py is not next to the notebook, provided the way the setup cell's instruction says.

Run: python -m pytest -q test_notebook.py
"""

import os
import pathlib
import shutil
import textwrap

import pytest

ROOT = os.path.dirname(os.path.abspath(__file__))
NOTEBOOK = os.path.join(ROOT, "tutorial.ipynb")
SHARED_ZIP = os.path.join(ROOT, "..", "shared", "data", "cifar10-train-jpeg75.zip")

nbformat = pytest.importorskip("nbformat", reason="jupyter is in requirements.txt")
nbclient = pytest.importorskip("nbclient", reason="jupyter is in requirements.txt")


def execute(nb, folder, monkeypatch, timeout=600):
    """Run `nb` in a fresh Jupyter kernel whose working directory is `folder`; raises on a cell error."""
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend draws the figures
    monkeypatch.delenv("PYTHONPATH", raising=False)  # nothing but the working directory provides speed.py
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny tensors; avoids oversubscription on shared cores
    nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(folder)}}).execute()
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


def stream_text(outputs):
    return "".join(o.get("text", "") for o in outputs if o.output_type == "stream")


@pytest.mark.skipif(not os.path.exists(SHARED_ZIP),
                    reason=f"needs the offline CIFAR-10 copy {SHARED_ZIP} (tests have no internet)")
def test_notebook_runs_top_to_bottom_in_small_mode(monkeypatch):
    """Every cell, in order, in the CPU-sized mode (SPEED_TUTORIAL_SMALL=1), from the repository."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    monkeypatch.setenv("SPEED_TUTORIAL_SMALL", "1")
    outputs = execute(nb, ROOT, monkeypatch)
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 8  # the plots were drawn
    text = stream_text(outputs)
    assert "SMALL mode: True" in text
    assert f"using {os.path.join(ROOT, 'speed.py')}" in text  # the speed.py next to the notebook


# What Colab's `files.upload()` does, for a kernel that is not in Colab: it "shows the dialog" (prints),
# saves the chosen files in the working directory and returns {name: bytes}. The user picks speed.py
# again after an earlier try, so Colab saves it as "speed (1).py" (what a real repeated upload does).
FAKE_COLAB = textwrap.dedent("""
    import os, sys, types
    def _upload():
        print("[fake Colab] upload dialog")
        chosen = {{"speed (1).py": {speed!r}, "train_tiny.py": {train_tiny!r}}}
        out = {{}}
        for name, src in chosen.items():
            with open(src, "rb") as f:
                data = f.read()
            with open(name, "wb") as f:
                f.write(data)
            out[name] = data
        return out
    files = types.ModuleType("google.colab.files")
    files.upload = _upload
    colab = types.ModuleType("google.colab")
    colab.files = files
    sys.modules.setdefault("google", types.ModuleType("google")).colab = colab
    sys.modules["google.colab"], sys.modules["google.colab.files"] = colab, files
""")


def setup_cells(nb):
    """The notebook's code cells up to and including the first one that imports speed."""
    cells = []
    for c in nb.cells:
        if c.cell_type == "code":
            cells.append(c)
            if "import speed" in c.source:
                return cells
    raise AssertionError("no code cell imports speed")


def test_notebook_setup_on_fresh_colab_uploads_speed(tmp_path, monkeypatch):
    """A fresh Colab: only the notebook in the working directory, speed.py not importable. The setup cell
    prints one instruction and opens the upload dialog; after the upload, the notebook imports speed
    from the uploaded file."""
    shutil.copy(NOTEBOOK, tmp_path / "tutorial.ipynb")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    fake = nbformat.v4.new_code_cell(FAKE_COLAB.format(speed=os.path.join(ROOT, "speed.py"),
                                                       train_tiny=os.path.join(ROOT, "train_tiny.py")))
    check = nbformat.v4.new_code_cell("import speed, train_tiny\nprint('speed from', speed.__file__)")
    probe = nbformat.v4.new_code_cell(
        "import importlib.util\nprint('speed importable:', importlib.util.find_spec('speed') is not None)")
    nb.cells = [probe, fake] + setup_cells(nb) + [check]
    text = stream_text(execute(nb, tmp_path, monkeypatch))
    assert "speed importable: False" in text  # before the setup cell ran
    instructions = [line for line in text.splitlines() if "speed.py is not next to this notebook" in line]
    assert len(instructions) == 1 and "train_tiny.py" in instructions[0]
    assert "[fake Colab] upload dialog" in text
    assert f"speed from {tmp_path / 'speed.py'}" in text
    assert (tmp_path / "speed.py").read_bytes() == pathlib.Path(ROOT, "speed.py").read_bytes()


def test_notebook_setup_without_speed_and_outside_colab_says_what_to_do(tmp_path, monkeypatch):
    """Outside Colab, with no speed.py and no REPO_URL, the setup cell stops with one clear message."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells = setup_cells(nb)[:1]
    with pytest.raises(nbclient.exceptions.CellExecutionError) as e:
        execute(nb, tmp_path, monkeypatch)
    assert "speed.py and train_tiny.py are not here" in str(e.value) and "REPO_URL" in str(e.value)
