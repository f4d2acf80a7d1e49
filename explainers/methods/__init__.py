"""The built-in explainers, one module per group of explainers; each module registers its
classes on import and :func:`xmllm.explainers.registry.load_builtin_explainers` imports them all."""
