"""sd-scripts-surge: surge distillation, ADA_SURGE/Cascade and FP64 streaming merges for the kohya world."""

__version__ = "0.1.0"
