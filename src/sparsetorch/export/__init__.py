"""Exporting sparse and shrunk models to other runtimes (ONNX)."""
from .onnx_export import export_onnx

__all__ = ["export_onnx"]
