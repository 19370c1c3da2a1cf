"""Teachers: freeze and wrap a teacher (PyTorch or ONNX Runtime) and cache its outputs; a run acquires
its teacher (train, reuse or load; layer choice) in ``teachers.acquire`` and gates it in ``teachers.gate``."""

from distill.teachers.frozen import Teacher, file_fingerprint, load_teacher

__all__ = ["Teacher", "file_fingerprint", "load_teacher"]
