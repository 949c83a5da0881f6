#!/usr/bin/env python3
"""A Hugging Face-style parquet image dataset for saev's dataset tests.

Writes tests/fixtures/data/hf-parquet/train-0000{0,1}-of-00002.parquet: the layout of
`datasets` Image features (column `image` = struct<bytes: binary, path: string>) with an int
`label` column, split over two files; 5 small PNGs cut from scikit-image's astronaut.
Needs pyarrow, pillow, scikit-image. CI never runs this; the outputs are committed.
"""
import io
import pathlib

import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import skimage

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "data" / "hf-parquet"
OUT.mkdir(parents=True, exist_ok=True)
astro = PIL.Image.fromarray(skimage.data.astronaut())
rows = []
for i in range(5):
    img = astro.crop((i * 40, i * 30, i * 40 + 48, i * 30 + 40))
    if i == 3:
        img = img.convert("L")  # a grey one
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    rows.append({"image": {"bytes": buf.getvalue(), "path": f"img{i}.png"}, "label": i % 2})
schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("label", pa.int64())])
for k, part in enumerate([rows[:3], rows[3:]]):
    pq.write_table(pa.Table.from_pylist(part, schema=schema), OUT / f"train-{k:05}-of-00002.parquet")
# The expected decoded pixels' checksums, for the test.
for i, r in enumerate(rows):
    im = PIL.Image.open(io.BytesIO(r["image"]["bytes"]))
    print(i, im.size, im.mode, sum(im.convert("RGB").tobytes()))
