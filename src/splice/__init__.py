"""splice: adapt pretrained models with lightweight modules and combine what was learned."""

__version__ = "0.1.0"
