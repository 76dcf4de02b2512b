"""The committed checkpoints and their index.json, installed with zoo as the package `zoo._weights`
(pyproject.toml maps it onto this folder) and read through importlib.resources by zoo.weights.index."""
