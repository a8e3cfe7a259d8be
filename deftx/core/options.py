"""Names of the choices the core offers, importable without torch (configuration validates them)."""

SVD_TARGETS: tuple[str, ...] = ("delta", "finetuned", "pretrained")   # what DeFT-X decomposes (deftx/core/denoise.py)
SVD_SOLVERS: tuple[str, ...] = ("auto", "gram", "full", "randomized")
HEAD_BIAS_INITS: tuple[str, ...] = ("unigram", "zero")   # a fresh MLM head's output bias (deftx/training/head_init.py)
