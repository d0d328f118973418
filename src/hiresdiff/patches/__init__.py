"""Everything that patches a model: official tables by UNet level, level addressing, and (later) the scheduled
module patches, attention processors and FreeU installed by one context (DESIGN "Model patches").

Submodules are imported explicitly (``from hiresdiff.patches import tables``); :mod:`~hiresdiff.patches.tables`
and :mod:`~hiresdiff.patches.levels` import no torch.
"""
