"""Every model source in one place: builtin architectures, timm, torchvision, ONNX specs (registry),
and the model-file format (file)."""

from distill.models import inception_bn, nin_bn  # noqa: F401  (register the builtins)
from distill.models.file import NotAModelFile, load_model, read_model_file, read_state_dict, save_model
from distill.models.registry import IMAGENET_MEAN, IMAGENET_STD, ModelCfg, ModelSpec, build_model, model_cfg, model_names, parse_spec, register_model

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "ModelCfg", "ModelSpec", "NotAModelFile", "build_model", "load_model", "model_cfg", "model_names", "parse_spec",
    "read_model_file", "read_state_dict", "register_model", "save_model",
]
