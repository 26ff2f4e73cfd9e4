"""Integrations with the tools users run: ``trl`` (patch TRL's trainers, 1.14 to 1.16, onto dpo_kernels)."""
