"""Students: ``@register_student`` and ``create_student`` on top of ``distill.models`` (NIN-BN is builtin)."""

import distill.models  # noqa: F401  (registers the builtin models, nin_bn among them)
from distill.students.registry import create_student, register_student, student_names

__all__ = ["create_student", "register_student", "student_names"]
