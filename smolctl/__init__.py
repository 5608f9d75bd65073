"""smolctl: pretrain, resume, chat with and export SmolLM2-135M from the command line."""

__version__ = "0.1.0"
