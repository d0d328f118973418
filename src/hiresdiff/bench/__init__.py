"""``hiresdiff bench``: generate a matrix of methods, presets, sizes, prompts, seeds and swept parameters, resumable
and sharded over processes with ``accelerate launch``, then report time, memory, FLOPs and metrics.

Modules, one job each: :mod:`~hiresdiff.bench.prompts` (prompt sets), :mod:`~hiresdiff.bench.plan` (the matrix and
its validation), :mod:`~hiresdiff.bench.records` (files on disk), :mod:`~hiresdiff.bench.runner` (generation and
measuring), :mod:`~hiresdiff.bench.report`, :mod:`~hiresdiff.bench.sheets`, :mod:`~hiresdiff.bench.plots`
(the report) and :mod:`~hiresdiff.bench.cli` (the command). Kept import-light: the command line imports this
package to register the command.
"""
