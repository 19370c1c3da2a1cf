"""Teachers: the builtin BN-Inception, timm/torchvision backbones, ONNX models, distill model files."""

from distill.teachers.registry import (
    Teacher,
    build_teacher_model,
    load_backbone_weights,
    load_teacher,
    teacher_names,
)

__all__ = ["Teacher", "build_teacher_model", "load_backbone_weights", "load_teacher", "teacher_names"]
