"""distill: knowledge distillation (Hinton KD + DarkRank) for deep metric learning."""

__version__ = "0.1.0"
