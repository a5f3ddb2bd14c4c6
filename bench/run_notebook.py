"""Execute a Jupyter notebook without Jupyter and write its outputs back (stdlib + matplotlib).

    python bench/run_notebook.py tutorial.ipynb                       # outputs written in place
    python bench/run_notebook.py tutorial.ipynb --out /tmp/run.ipynb --timeout-cell 600

For machines (e.g. a GPU box) that have torch and matplotlib but no jupyter/nbconvert. Code cells run
in order in one namespace, with the notebook's folder as the working directory, like a kernel would:
- stdout / stderr become `stream` outputs (carriage returns collapsed, so tqdm bars keep their last state);
- every matplotlib figure shown (plt.show, or left open at the end of a cell) becomes a PNG
  `display_data` output (--dpi, default 80; figures over --max-kb are stored as 256-colour PNG or
  JPEG-95, keeping the notebook small);
- a trailing expression's repr becomes an `execute_result`; `display(obj)` is provided too;
- lines starting with `%` (magics) or `!` (shell) are skipped with a note;
- on an exception the cell gets an `error` output, the notebook is written, and the exit status is 1.
The result is an nbformat v4 notebook (cell ids kept).
"""

import argparse
import ast
import base64
import io
import json
import os
import signal
import sys
import time
import traceback

os.environ.setdefault("MPLBACKEND", "Agg")


class CellTimeout(Exception):
    pass


class Outputs:
    """The outputs of one cell, in order; consecutive writes to one stream are merged."""

    def __init__(self):
        self.items = []

    def stream(self, name, text):
        if not text:
            return
        if self.items and self.items[-1]["output_type"] == "stream" and self.items[-1]["name"] == name:
            self.items[-1]["text"] += text
        else:
            self.items.append({"output_type": "stream", "name": name, "text": text})

    def add(self, item):
        self.items.append(item)

    def finish(self):
        for o in self.items:
            if o["output_type"] == "stream":
                o["text"] = _collapse_cr(o["text"])
        return [o for o in self.items if o["output_type"] != "stream" or o["text"]]


def _collapse_cr(text):
    """What a terminal would show: within each line only the text after the last carriage return."""
    lines = text.split("\n")
    out = []
    for line in lines:
        parts = [p for p in line.split("\r") if p]
        out.append(parts[-1] if parts else "")
    return "\n".join(out)


class Tee(io.TextIOBase):
    """A text stream that records into the current cell's outputs."""

    def __init__(self, runner, name):
        self.runner, self.name = runner, name

    def writable(self):
        return True

    def write(self, s):
        self.runner.outputs.stream(self.name, s)
        return len(s)

    def flush(self):
        pass

    def isatty(self):
        return False


def compact_image(png, max_kb=64):
    """Keep a figure's PNG when it is under max_kb; else a 256-colour PNG (plots lose nothing
    visible); else, for photo-like figures such as sample grids, JPEG at quality 95 without chroma
    subsampling. Keeps the committed notebook small (the repository travels to the GPU machine)."""
    if len(png) <= max_kb * 1024:
        return "image/png", png
    from PIL import Image
    img = Image.open(io.BytesIO(png)).convert("RGB")
    buf = io.BytesIO()
    img.quantize(256, method=Image.Quantize.MEDIANCUT).save(buf, "PNG", optimize=True)
    if buf.tell() <= max_kb * 1024:
        return "image/png", buf.getvalue()
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, subsampling=0)
    return "image/jpeg", buf.getvalue()


class Runner:
    def __init__(self, dpi=80, max_kb=64):
        self.dpi, self.max_kb = dpi, max_kb
        self.outputs = Outputs()
        self.ns = {"__name__": "__main__", "__builtins__": __builtins__, "display": self.display}
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        plt.switch_backend("Agg")  # resolve the backend before patching pyplot

        def show(*args, **kwargs):  # the notebook's plt.show() lands here
            self._show()
        self.plt = plt
        plt.show = show

    # -- rich outputs ------------------------------------------------------------------------------
    def _figure_output(self, fig):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=self.dpi, bbox_inches="tight")
        w, h = fig.get_size_inches() * fig.dpi
        mime, data = compact_image(buf.getvalue(), self.max_kb)
        return {"output_type": "display_data", "metadata": {},
                "data": {mime: base64.b64encode(data).decode("ascii"),
                         "text/plain": f"<Figure size {w:.0f}x{h:.0f} with {len(fig.axes)} Axes>"}}

    def _show(self, *args, **kwargs):
        for num in self.plt.get_fignums():
            fig = self.plt.figure(num)
            self.outputs.add(self._figure_output(fig))
            self.plt.close(fig)

    def display(self, *objs, **kwargs):
        for obj in objs:
            if hasattr(obj, "savefig") and hasattr(obj, "get_size_inches"):  # a matplotlib Figure
                self.outputs.add(self._figure_output(obj))
                self.plt.close(obj)
                continue
            data = {"text/plain": repr(obj)}
            for mime, method in (("image/png", "_repr_png_"), ("text/markdown", "_repr_markdown_"),
                                 ("text/html", "_repr_html_")):
                if hasattr(obj, method):
                    value = getattr(obj, method)()
                    if value is not None:
                        data[mime] = base64.b64encode(value).decode("ascii") if isinstance(value, bytes) else value
            self.outputs.add({"output_type": "display_data", "metadata": {}, "data": data})

    # -- running a cell ------------------------------------------------------------------------------
    def _strip_magics(self, source):
        lines = []
        for line in source.split("\n"):
            s = line.lstrip()
            if s.startswith(("%", "!")):
                self.outputs.stream("stderr", f"[run_notebook] skipped: {s}\n")
                line = line[: len(line) - len(s)] + "pass"
            lines.append(line)
        return "\n".join(lines)

    def run(self, source, count, timeout):
        """Run one cell's source; returns (outputs, error_or_None)."""
        self.outputs = Outputs()
        old = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = Tee(self, "stdout"), Tee(self, "stderr")
        error = None
        if timeout:
            signal.signal(signal.SIGALRM, _alarm)
            signal.alarm(timeout)
        try:
            tree = ast.parse(self._strip_magics(source), filename=f"<cell {count}>")
            last = None
            if tree.body and isinstance(tree.body[-1], ast.Expr):
                last = ast.Expression(tree.body.pop().value)
            exec(compile(tree, f"<cell {count}>", "exec"), self.ns)
            if last is not None:
                value = eval(compile(last, f"<cell {count}>", "eval"), self.ns)
                if value is not None:
                    self.ns["_"] = value
                    self.outputs.add({"output_type": "execute_result", "execution_count": count,
                                      "metadata": {}, "data": {"text/plain": repr(value)}})
        except BaseException as e:  # noqa: B902 -- recorded as the cell's error, like a kernel
            if isinstance(e, (SystemExit,)) and not e.code:
                pass
            else:
                error = e
                tb = traceback.format_exception(type(e), e, e.__traceback__)
                tb = [t for t in tb if "run_notebook.py" not in t]  # keep the notebook's own frames
                self.outputs.add({"output_type": "error", "ename": type(e).__name__, "evalue": str(e),
                                  "traceback": [t.rstrip("\n") for t in tb]})
        finally:
            if timeout:
                signal.alarm(0)
            sys.stdout.flush()
            sys.stdout, sys.stderr = old
        self._show()  # figures left open at the end of the cell
        return self.outputs.finish(), error


def _alarm(signum, frame):
    raise CellTimeout("cell ran past --timeout-cell")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("notebook")
    p.add_argument("--out", default=None, help="where to write the executed notebook (default: in place)")
    p.add_argument("--timeout-cell", type=int, default=0, help="seconds per cell (0 = no limit)")
    p.add_argument("--dpi", type=int, default=80, help="resolution of captured figures")
    p.add_argument("--max-kb", type=int, default=64, help="figures above this are stored compactly")
    args = p.parse_args(argv)

    src = os.path.abspath(args.notebook)
    out = os.path.abspath(args.out or args.notebook)
    with open(src, encoding="utf-8") as f:
        nb = json.load(f)
    if nb.get("nbformat") != 4:
        raise SystemExit(f"{src}: only nbformat 4 notebooks are supported")

    os.chdir(os.path.dirname(src))
    sys.path.insert(0, os.path.dirname(src))
    runner = Runner(dpi=args.dpi, max_kb=args.max_kb)
    for cell in nb["cells"]:  # start clean: no stale outputs from an earlier run
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None

    count, failed, t_all = 0, False, time.perf_counter()
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        if not source.strip():
            continue
        count += 1
        t0 = time.perf_counter()
        outputs, error = runner.run(source, count, args.timeout_cell)
        cell["outputs"], cell["execution_count"] = outputs, count
        first = source.strip().split("\n")[0][:60]
        print(f"[run_notebook] cell {count:2d} ({time.perf_counter() - t0:6.1f} s): {first}", file=sys.stderr)
        if error is not None:
            print(f"[run_notebook] cell {count} failed: {type(error).__name__}: {error}", file=sys.stderr)
            failed = True
            break

    nb.setdefault("metadata", {})
    with open(out, "w", encoding="utf-8") as f:
        json.dump(nb, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"[run_notebook] {'FAILED' if failed else 'done'} in {time.perf_counter() - t_all:.0f} s -> {out} "
          f"({os.path.getsize(out) / 1e6:.2f} MB)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
