from . import transformer_student  # noqa: F401
