"""The ONNX form of vnm::linear: one ``vnm_compile.VNMLinear`` node and its function body.

Every lowered V:N:M linear becomes one node in the custom domain ``vnm_compile``
whose inputs are the compressed tensors of :class:`~vnm_compile.format.VNMWeight`
(stored as initializers: the file stays compressed) and whose attributes are the
pattern and shape. The model also carries an ONNX *function* of the same
domain and name, written with standard ops only, so any ONNX runtime can run
the node without a plugin; TensorRT drops the function and maps the node to
its V:N:M plugin instead (``vnm_compile.export.tensorrt``).

Node signature (fixed arity, so plugins see the same inputs every time)::

    Y = vnm_compile.VNMLinear(X, values, columns, meta, row_index, bias,
                              v=<block rows>, n=, m=, out_features=, in_features=)

- ``X`` (..., in_features) float; ``Y`` (..., out_features), X's dtype.
- ``values`` (Rp, G*n), ``columns`` (B, G, 4) int16/int32, ``meta`` (Rp, W) int32:
  the layout of vnm_compile/format.py.
- ``row_index`` int32: (Rp,) with an output permutation, or an empty (0,) tensor
  for none. ``bias``: (out_features,) or an empty (0,) tensor for none.

The body rebuilds the dense W^T (in, out) from the compressed tensors (unpack
the 2-bit metadata, gather the absolute columns, scatter-add the values) and
multiplies. Everything up to the MatMul depends on initializers only, so
onnxruntime constant-folds the rebuild once at session start and then runs a
dense MatMul: the file is V:N:M-sized, the speed is that of the dense model.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "DOMAIN",
    "OP_TYPE",
    "DOMAIN_VERSION",
    "ATTRIBUTES",
    "MIN_OPSET",
    "vnm_linear_function",
    "register_schema",
]

DOMAIN = "vnm_compile"
OP_TYPE = "VNMLinear"
DOMAIN_VERSION = 1
INPUTS = ("X", "values", "columns", "meta", "row_index", "bias")
ATTRIBUTES = ("v", "n", "m", "out_features", "in_features")
# BitwiseAnd (the metadata unpacking) is opset 18; older opsets are refused.
MIN_OPSET = 18

# 2-bit fields per 32-bit metadata word (16), shifted out with an integer
# division by 4**k: ONNX BitShift only takes unsigned types.
_FIELDS_PER_WORD = 16


def _const(helper, numpy_helper, name: str, value) -> object:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name))


def _attr_const(onnx, helper, name: str, attr: str) -> object:
    """A Constant node holding the calling node's int attribute ``attr`` (a 0-d int64)."""
    node = helper.make_node("Constant", [], [name])
    ref = onnx.AttributeProto()
    ref.name, ref.ref_attr_name, ref.type = "value_int", attr, onnx.AttributeProto.INT
    node.attribute.append(ref)
    return node


def register_schema() -> None:
    """Register the VNMLinear OpSchema with the onnx package (once per process).

    onnxscript builds nodes only for ops with a schema; the schema also lets
    onnx.checker validate the node's inputs and attributes.
    """
    from onnx import defs

    if defs.has(OP_TYPE, DOMAIN_VERSION, DOMAIN):
        return
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"]
    param = defs.OpSchema.FormalParameter
    schema = defs.OpSchema(
        OP_TYPE,
        DOMAIN,
        DOMAIN_VERSION,
        "y = x @ W^T + b with a V:N:M-compressed W (vnm_compile/format.py); see its function body",
        inputs=[
            param("X", "T"),
            param("values", "TW"),
            param("columns", "TI"),
            param("meta", "tensor(int32)"),
            param("row_index", "tensor(int32)"),
            param("bias", "TB"),
        ],
        outputs=[param("Y", "T")],
        type_constraints=[
            ("T", floats, "activations"),
            ("TW", floats, "kept weight values"),
            ("TI", ["tensor(int16)", "tensor(int32)"], "absolute input column indices"),
            ("TB", floats, "bias, or an empty tensor"),
        ],
        attributes=[defs.OpSchema.Attribute(a, defs.OpSchema.AttrType.INT, "") for a in ATTRIBUTES],
    )
    defs.register_schema(schema)


def vnm_linear_function(opset: int) -> object:
    """The ``vnm_compile.VNMLinear`` FunctionProto (standard ops of ``opset``)."""
    import onnx
    from onnx import helper, numpy_helper

    if opset < MIN_OPSET:
        raise ValueError(f"the VNMLinear function needs ONNX opset >= {MIN_OPSET}, got {opset}")
    mk = helper.make_node
    i64 = onnx.TensorProto.INT64
    nodes = [
        # Constants.
        _const(helper, numpy_helper, "c0", np.int64(0)),
        _const(helper, numpy_helper, "c1", np.int64(1)),
        _const(helper, numpy_helper, "c16", np.int64(_FIELDS_PER_WORD)),
        _const(helper, numpy_helper, "c_mask32", np.int64(0xFFFFFFFF)),
        _const(helper, numpy_helper, "c3", np.int64(3)),
        _const(helper, numpy_helper, "c_pow4", (4 ** np.arange(_FIELDS_PER_WORD, dtype=np.int64))),
        _const(helper, numpy_helper, "ax0", np.array([0], dtype=np.int64)),
        _const(helper, numpy_helper, "ax1", np.array([1], dtype=np.int64)),
        _const(helper, numpy_helper, "ax2", np.array([2], dtype=np.int64)),
        _const(helper, numpy_helper, "axm1", np.array([-1], dtype=np.int64)),
        _const(helper, numpy_helper, "one_1d", np.array([1], dtype=np.int64)),
        _const(helper, numpy_helper, "four_1d", np.array([4], dtype=np.int64)),
        _const(helper, numpy_helper, "shape_col", np.array([-1, 1, 1], dtype=np.int64)),
        _attr_const(onnx, helper, "out_f", "out_features"),
        _attr_const(onnx, helper, "in_f", "in_features"),
        # 0. Sizes from the stored tensors: Rp rows, G groups, B row blocks, v = Rp / B, n = G*n / G.
        mk("Shape", ["values"], ["v_shape"]),
        mk("Shape", ["columns"], ["c_shape"]),
        mk("Gather", ["v_shape", "c0"], ["rows_p"]),
        mk("Gather", ["v_shape", "c1"], ["slots"]),
        mk("Gather", ["c_shape", "c0"], ["blocks"]),
        mk("Gather", ["c_shape", "c1"], ["groups"]),
        mk("Div", ["slots", "groups"], ["n_"]),
        mk("Div", ["rows_p", "blocks"], ["v_"]),
        mk("Div", ["c16", "n_"], ["gpw"]),
        mk("Mul", ["gpw", "n_"], ["fields"]),
        mk("Unsqueeze", ["rows_p", "ax0"], ["rows_p_1d"]),
        mk("Unsqueeze", ["groups", "ax0"], ["groups_1d"]),
        mk("Unsqueeze", ["n_", "ax0"], ["n_1d"]),
        mk("Unsqueeze", ["v_", "ax0"], ["v_1d"]),
        mk("Unsqueeze", ["fields", "ax0"], ["fields_1d"]),
        # 1. Metadata -> positions (Rp, G, n) in 0..3: field k of a word is bits 2k..2k+1.
        mk("Cast", ["meta"], ["meta64"], to=i64),
        mk("BitwiseAnd", ["meta64", "c_mask32"], ["words"]),  # two's complement -> unsigned 32 bit
        mk("Unsqueeze", ["words", "axm1"], ["words3"]),
        mk("Div", ["words3", "c_pow4"], ["shifted"]),
        mk("BitwiseAnd", ["shifted", "c3"], ["all_fields"]),  # (Rp, W, 16)
        mk("Slice", ["all_fields", "ax0", "fields_1d", "ax2"], ["used_fields"]),  # (Rp, W, gpw*n)
        mk("Concat", ["rows_p_1d", "axm1", "n_1d"], ["pos_shape"], axis=0),
        mk("Reshape", ["used_fields", "pos_shape"], ["pos_all"]),  # (Rp, W*gpw, n)
        mk("Slice", ["pos_all", "ax0", "groups_1d", "ax1"], ["pos"]),  # (Rp, G, n)
        # 2. Absolute input column of every stored value: columns[r // v, g, pos].
        mk("Cast", ["columns"], ["cols64"], to=i64),  # int16 indices -> int64 for Gather*
        mk("Unsqueeze", ["cols64", "ax1"], ["cols4"]),  # (B, 1, G, 4)
        mk("Concat", ["one_1d", "v_1d", "one_1d", "one_1d"], ["expand_shape"], axis=0),
        mk("Expand", ["cols4", "expand_shape"], ["cols_rows"]),  # (B, v, G, 4)
        mk("Concat", ["rows_p_1d", "groups_1d", "four_1d"], ["rc_shape"], axis=0),
        mk("Reshape", ["cols_rows", "rc_shape"], ["row_cols"]),  # (Rp, G, 4)
        mk("GatherElements", ["row_cols", "pos"], ["abs_cols"], axis=2),  # (Rp, G, n)
        # 3. Destination row of every stored row: row_index, or identity when it is empty;
        #    padding rows (-1) go to a dump row Rp that is sliced away.
        mk("Cast", ["row_index"], ["ri64"], to=i64),
        mk("Size", ["ri64"], ["ri_len"]),
        mk("Range", ["ri_len", "rows_p", "c1"], ["ri_tail"]),
        mk("Concat", ["ri64", "ri_tail"], ["dst_all"], axis=0),
        mk("Less", ["dst_all", "c0"], ["is_pad"]),
        mk("Where", ["is_pad", "rows_p", "dst_all"], ["dst"]),
        # 4. Scatter-add the values into W^T (in, Rp + 1); fillers are zeros and may repeat a column.
        mk("Add", ["rows_p", "c1"], ["width"]),
        mk("Mul", ["abs_cols", "width"], ["col_off"]),
        mk("Reshape", ["dst", "shape_col"], ["dst3"]),
        mk("Add", ["col_off", "dst3"], ["flat3"]),
        mk("Reshape", ["flat3", "axm1"], ["flat"]),
        mk("Cast", ["values"], ["values32"], to=onnx.TensorProto.FLOAT),
        mk("Reshape", ["values32", "axm1"], ["vals"]),
        mk("Mul", ["in_f", "width"], ["numel"]),
        mk("Unsqueeze", ["numel", "ax0"], ["numel_1d"]),
        mk("ConstantOfShape", ["numel_1d"], ["zeros"], value=numpy_helper.from_array(np.zeros(1, np.float32))),
        mk("ScatterElements", ["zeros", "flat", "vals"], ["wt_flat"], axis=0, reduction="add"),
        mk("Unsqueeze", ["in_f", "ax0"], ["in_1d"]),
        mk("Unsqueeze", ["width", "ax0"], ["width_1d"]),
        mk("Concat", ["in_1d", "width_1d"], ["wt_shape"], axis=0),
        mk("Reshape", ["wt_flat", "wt_shape"], ["wt_full"]),
        mk("Unsqueeze", ["out_f", "ax0"], ["out_1d"]),
        mk("Slice", ["wt_full", "ax0", "out_1d", "ax1"], ["wt32"]),  # (in, out)
        # 5. Y = X @ W^T + bias (an empty bias is padded to zeros).
        mk("CastLike", ["wt32", "X"], ["wt"]),
        mk("MatMul", ["X", "wt"], ["xw"]),
        mk("Shape", ["bias"], ["b_shape"]),  # not Size: onnxruntime's CPU Size has no fp16 kernel to fold
        mk("Gather", ["b_shape", "c0"], ["b_len"]),
        mk("Sub", ["out_f", "b_len"], ["b_missing"]),
        mk("Unsqueeze", ["b_missing", "ax0"], ["b_missing_1d"]),
        mk("Concat", ["ax0", "b_missing_1d"], ["b_pads"], axis=0),
        mk("Cast", ["bias"], ["bias32"], to=onnx.TensorProto.FLOAT),  # onnxruntime's CPU Pad has no fp16 kernel
        mk("Pad", ["bias32", "b_pads"], ["bias_full"]),
        mk("CastLike", ["bias_full", "X"], ["bias_x"]),
        mk("Add", ["xw", "bias_x"], ["Y"]),
    ]
    return helper.make_function(
        DOMAIN,
        OP_TYPE,
        list(INPUTS),
        ["Y"],
        nodes,
        [helper.make_opsetid("", opset)],
        list(ATTRIBUTES),
        doc_string="y = x @ W^T + b with W rebuilt from V:N:M-compressed tensors (vnm_compile/format.py)",
    )
