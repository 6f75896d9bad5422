"""TensorRT engine backend (being rewritten torch-free with cuda-python; see the triton branch)."""

from __future__ import annotations

from cddrec.errors import BackendUnavailable


class TrtBackend:
    @classmethod
    def load(cls, path, *, k=None, threads: int = 0, **kwargs):
        try:
            import tensorrt  # noqa: F401
        except ImportError as e:
            raise BackendUnavailable("the trt backend needs TensorRT: pip install 'cddrec[gpu]' (tensorrt) on a "
                                     "machine with an NVIDIA GPU") from e
        raise BackendUnavailable("the trt backend is being rewritten without torch")
