"""Teachers: freeze and wrap a teacher (PyTorch or ONNX Runtime), and cache its outputs."""

from distill.teachers.frozen import Teacher, file_fingerprint, load_teacher

__all__ = ["Teacher", "file_fingerprint", "load_teacher"]
