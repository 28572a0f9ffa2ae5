from . import transformer_mutual, transformer_student  # noqa: F401
