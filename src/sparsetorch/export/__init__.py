"""Exporting sparse and shrunk models to other runtimes (ONNX)."""
from .onnx import export_onnx
from .onnx_decoder import DecoderLogits

__all__ = ["export_onnx", "DecoderLogits"]
