"""llmopt.codegen.kernels."""
