"""Make saev/assets/DejaVuSans-subset.ttf: DejaVu Sans (Debian fonts-dejavu-core) cut down to
printable ASCII plus a few symbols, embedded by saev for captions on PNG pictures (so drawing
text needs no system fonts). License: saev/assets/DejaVu-LICENSE.txt.

Usage: python scripts/subset_font.py [/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf]
"""

import pathlib
import sys

from fontTools import subset

src = sys.argv[1] if len(sys.argv) > 1 else "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
out = pathlib.Path(__file__).resolve().parent.parent / "saev" / "assets" / "DejaVuSans-subset.ttf"
opts = subset.Options()
opts.layout_features = []
opts.hinting = False
opts.name_IDs = ["*"]
font = subset.load_font(src, opts)
s = subset.Subsetter(opts)
s.populate(unicodes=list(range(0x20, 0x7F)) + [0xB7, 0xD7, 0x2026, 0x2212, 0x2264, 0x2265, 0x3BB])
s.subset(font)
subset.save_font(font, str(out), opts)
print(out, out.stat().st_size)
