"""chatforge: build your own ChatGPT-style assistant end to end."""

__version__ = "0.1.0"
