"""The torch-free half of every method: its parameter class, presets, strength mapping and registry record.

One module per method, named like its recipe in :mod:`hiresdiff.methods` (which holds the algorithm and imports
torch, the sampler and the model adapters). The command line lists, parses and validates methods from these
modules alone — ``hiresdiff --help``, ``hiresdiff methods`` and a bad ``--set`` answer without importing torch —
and :meth:`~hiresdiff.methods.base.Method.run` imports the recipe named by the record when the method runs.
"""
