"""Student registry (``@register_student``, ``create_student``) and the builtin NIN-BN student."""

from distill.students.registry import create_student, register_student, student_names, timm_model
from distill.students import nin_bn  # noqa: F401  (registers "nin_bn")

__all__ = ["create_student", "register_student", "student_names", "timm_model"]
