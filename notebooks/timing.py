"""Time a notebook cell by cell with the "Rust (saev)" kernel: kernel start → ready, each cell,
and kernel start → the first image output (the issue's "first heatmap" figure).

    python3 notebooks/timing.py notebooks/01-quickstart.ipynb   (run from notebooks/.work)

Executes in the current directory (stores and runs land there); prints a table; writes nothing
back to the notebook.
"""

import sys
import time

import nbformat
from jupyter_client.manager import start_new_kernel

IMAGE = ("image/png", "image/svg+xml")

nb = nbformat.read(sys.argv[1], as_version=4)
t0 = time.time()
km, kc = start_new_kernel(kernel_name="rust-saev", startup_timeout=1800)
ready = time.time() - t0
print(f"kernel ready: {ready:.1f} s")
first_image = None
try:
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        c0 = time.time()
        msg_id = kc.execute(cell.source)
        kinds = set()
        while True:
            msg = kc.get_iopub_msg(timeout=1800)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            t, content = msg["msg_type"], msg["content"]
            if t in ("display_data", "execute_result"):
                data = content.get("data", {})
                kinds.update(data)
                has_img = any(m in data for m in IMAGE) or "base64," in str(data.get("text/html", ""))
                if has_img and first_image is None:
                    first_image = time.time() - t0
            elif t == "stream" and content["name"] == "stderr":
                print(f"  cell {i} stderr: {content['text'].strip()[:200]}")
            elif t == "status" and content["execution_state"] == "idle":
                break
        first = cell.source.strip().splitlines()[0][:60]
        print(f"cell {i:2d}: {time.time() - c0:6.1f} s  {first}")
finally:
    kc.stop_channels()
    km.shutdown_kernel(now=True)
print(f"kernel start → first image output: {first_image:.1f} s" if first_image else "no image output")
print(f"total: {time.time() - t0:.1f} s")
