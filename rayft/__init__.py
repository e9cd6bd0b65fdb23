"""rayft: fine-tune pretrained language models at cluster scale on Ray."""

__version__ = "0.1.0"
