"""llmopt.targets."""
