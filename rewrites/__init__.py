"""graftfx.rewrites: what plugs into the engine.

``patterns/`` (region matchers), ``operators/`` (replacement operators), ``rules/`` (bundled
TOML rule files, one per experiment of the paper) and ``studies/`` (study files). Each pattern
and operator module registers itself with :mod:`graftfx.registry` when imported; the registry
imports them all on first lookup. The vocabulary (rules, registry, records) is the engine's:
``graftfx.rules``, ``graftfx.registry``, ``graftfx.match``.
"""
from pathlib import Path

FOLDER = Path(__file__).resolve().parent
RULES_DIR = FOLDER / "rules"
STUDIES_DIR = FOLDER / "studies"
