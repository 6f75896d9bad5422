"""The one reader of an ONNX graph's cddrec metadata on the export side (torch-free: onnx only).

Serving reads the same metadata through ONNX Runtime (``OrtBackend.metadata``) and checks it with
``cddrec.contract.serving_info``; this reader is for graphs held as ONNX protos (the TensorRT
builder, the Triton repository writer, tests). ``onnx_export.write_metadata`` writes it.
"""

from __future__ import annotations

from pathlib import Path

import onnx


def read_metadata(path_or_model: str | Path | onnx.ModelProto) -> dict[str, str]:
    """The graph's ``metadata_props`` as a dict; a path is loaded without its external data."""
    m = path_or_model if isinstance(path_or_model, onnx.ModelProto) else onnx.load(str(path_or_model),
                                                                                    load_external_data=False)
    return {p.key: p.value for p in m.metadata_props}
