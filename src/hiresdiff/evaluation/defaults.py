"""The models the metrics and the captioner load by default (torch-free: the ``eval``, ``dataset`` and ``bench``
parsers show them in ``--help``)."""

#: CLIP model of the CLIP score (and of ``bench``'s scoring)
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
#: image-captioning model ``hiresdiff dataset --caption`` uses for images without a caption
DEFAULT_CAPTIONER = "Salesforce/blip-image-captioning-large"
