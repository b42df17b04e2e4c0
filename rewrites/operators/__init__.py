"""Replacement operators. Every module here registers itself with ``@register_operator``;
the registry imports them all on first lookup, so adding an operator is adding a file."""
