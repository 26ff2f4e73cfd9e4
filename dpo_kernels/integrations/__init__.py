"""Integrations with the tools users run: ``trl`` (patch TRL 1.16's trainers onto dpo_kernels)."""
