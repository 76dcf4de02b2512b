"""Model families. Each module registers its entry points; `zoo._registry.FAMILY_MODULES` lists them."""
