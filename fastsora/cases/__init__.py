"""Check and benchmark cases of each op family, registered with fastsora.registry.register_op."""
