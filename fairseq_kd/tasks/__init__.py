from . import translation_distillation, translation_multi_distillation  # noqa: F401
