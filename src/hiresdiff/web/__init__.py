"""``hiresdiff serve``: the web page over :class:`~hiresdiff.HiresPipeline` (gradio, the ``[web]`` extra)."""
