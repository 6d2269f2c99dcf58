"""The demo (``nox -s demo``): float vs LSQ 4/3/2-bit RetinaNet and FCOS R-18, one table and two plots.

An application of the library, kept apart from it (like detectron2's ``projects/``): it is run from the
repository root (``python -m demo``) and is not part of the installed ``model_quantization`` package.

:mod:`.plan` says what runs (variants, modes), :mod:`.run` trains and evaluates one variant through
detectron2's trainer and caches float runs, :mod:`.report` writes the table and plots, and
``python -m demo`` ties them together with a progress line per phase.
"""
