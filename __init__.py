"""llmopt: trace an LLM into llmopt's IR, rewrite it with passes, lower it through TVM, run it."""

__version__ = "0.1.0"
