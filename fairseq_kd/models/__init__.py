from . import nat_student, transformer_mutual, transformer_student  # noqa: F401
