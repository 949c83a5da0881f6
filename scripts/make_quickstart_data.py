"""Make the quickstart's embedded image set (saev/assets/quickstart/):

- fashion-mnist-3000-{images-idx3,labels-idx1}-ubyte.gz: the first 3,000 images and labels of the
  Fashion-MNIST test set (Debian `dataset-fashion-mnist`; MIT licence, Zalando Research), as IDX.
- photos/*.jpg: five public-domain / CC0 photos shipped with scikit-image (astronaut: NASA, public
  domain; chelsea: CC0, Stefan van der Walt; coffee: CC0, Rachel Michetti; rocket: SpaceX, public
  domain; hubble_deep_field: NASA, public domain), longest side 512, JPEG quality 90.

Usage: python scripts/make_quickstart_data.py  (needs numpy, pillow, scikit-image; never run in CI)
"""

import gzip
import os
import pathlib

import numpy as np
import skimage
from PIL import Image

SRC = pathlib.Path("/usr/share/datasets/fashion-mnist")
OUT = pathlib.Path(__file__).resolve().parent.parent / "saev" / "assets" / "quickstart"
N = 3000
(OUT / "photos").mkdir(parents=True, exist_ok=True)

imgs = gzip.open(SRC / "t10k-images-idx3-ubyte.gz").read()
labs = gzip.open(SRC / "t10k-labels-idx1-ubyte.gz").read()
head = np.frombuffer(imgs[:16], dtype=">u4").copy()
head[1] = N
with gzip.GzipFile(OUT / "fashion-mnist-3000-images-idx3-ubyte.gz", "wb", mtime=0) as f:
    f.write(head.astype(">u4").tobytes() + imgs[16 : 16 + N * 28 * 28])
lhead = np.frombuffer(labs[:8], dtype=">u4").copy()
lhead[1] = N
with gzip.GzipFile(OUT / "fashion-mnist-3000-labels-idx1-ubyte.gz", "wb", mtime=0) as f:
    f.write(lhead.astype(">u4").tobytes() + labs[8 : 8 + N])

data = pathlib.Path(os.path.dirname(skimage.__file__)) / "data"
for name in ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg"]:
    im = Image.open(data / name).convert("RGB")
    im.thumbnail((512, 512))
    im.save(OUT / "photos" / (name.rsplit(".", 1)[0] + ".jpg"), quality=90)
for p in sorted(OUT.rglob("*")):
    if p.is_file():
        print(p.relative_to(OUT), p.stat().st_size)
