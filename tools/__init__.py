"""jaxres's tools: python -m tools.NAME from a checkout, python -m jaxres.tools.NAME where
jaxres is installed from a wheel (pyproject.toml installs this folder as jaxres.tools).
Modules here import each other relatively, so both names work."""
