from . import kd_label_smoothed_cross_entropy  # noqa: F401
