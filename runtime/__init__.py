"""llmopt.runtime."""
