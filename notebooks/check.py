"""Fail on any error output in a notebook, and on drawing cells without an image output.

A drawing cell is a code cell whose last line builds a picture: `grid(`, `heatmap(`, `scatter(`,
`HistoryPlot`, `.frontier(`, `search(`, `run(` on an intervention, or a backbone/store summary.
"""

import sys

import nbformat

DRAWS = ("grid(", "heatmap(", "scatter(", "HistoryPlot", ".plot(", ".frontier(", ".search(", "iv.run(")
IMAGE = ("image/png", "image/svg+xml")

bad = 0
for path in sys.argv[1:]:
    nb = nbformat.read(path, as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        outs = cell.get("outputs", [])
        for o in outs:
            # evcxr reports a cell's `Err` (and compile errors) on stderr, not as an error
            # message; progress bars are quiet without a TTY, so any stderr output is a failure.
            if o.get("output_type") == "error" or o.get("name") == "stderr":
                print(f"{path}: cell {i}: error output: {o.get('ename', '')} {o.get('evalue', o.get('text', ''))[:300]}")
                bad += 1
        last = cell.source.strip().splitlines()[-1] if cell.source.strip() else ""
        if any(k in last for k in DRAWS):
            data = [o.get("data", {}) for o in outs if o.get("output_type") in ("display_data", "execute_result")]
            has_img = any(any(m in d for m in IMAGE) or "base64," in str(d.get("text/html", "")) for d in data)
            if not has_img:
                print(f"{path}: cell {i}: a drawing cell without an image output: {last}")
                bad += 1
    print(f"{path}: {len(nb.cells)} cells checked")
sys.exit(1 if bad else 0)
