from . import errors, safe_load, criterions, models, tasks  # noqa: F401
