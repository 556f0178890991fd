"""Training: YAML configs with overrides, the Lightning module and the run driver."""
