"""Developer tools: ``python -m dpo_kernels.tools.compile_check`` compiles the kernels ahead of time."""
