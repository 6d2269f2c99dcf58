"""The demo (``nox -s demo``): float vs LSQ 4/3/2-bit RetinaNet and FCOS R-18, one table and two plots.

:mod:`.plan` says what runs (variants, modes), :mod:`.run` trains and evaluates one variant through
detectron2's trainer and caches float runs, :mod:`.report` writes the table and plots, and
``python -m model_quantization.demo`` ties them together with a progress line per phase.
"""
